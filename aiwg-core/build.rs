//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the files of
//! `migrations/` at compile time but does not tell Cargo to watch the folder.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
