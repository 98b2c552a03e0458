//! Project path policy: which directories a job may run in.
//!
//! A job's project is given as a path (absolute, or relative to the first root) or as a key
//! (a repository name or keyword) that the mapping rules turn into a path. The result must
//! exist and, after canonicalisation with symlinks followed, lie inside one of the configured
//! roots and outside every forbidden path. Each refusal is its own [`PolicyError`] variant.
//!
//! The engine checks a job's project twice: when the job is submitted (a refusal is the
//! submit's answer), and again before an agent first gets the directory in each attempt
//! ([`ProjectPolicy::recheck`]): a directory replaced meanwhile by a symlink, moved or removed
//! fails the job instead of handing the agent whatever the path now leads to.

use std::path::{Component, Path, PathBuf};

use regex::Regex;

/// Why a project path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No root is configured, so no path can be accepted.
    #[error("no project root is configured")]
    NoRoot,
    /// The path is empty or contains a NUL byte.
    #[error("the project path is empty or malformed")]
    Malformed,
    /// The path does not exist (or cannot be read).
    #[error("project path `{0}` does not exist")]
    NotFound(String),
    /// The path is not a directory.
    #[error("project path `{0}` is not a directory")]
    NotADirectory(String),
    /// `..` components lead outside the root.
    #[error("project path `{0}` escapes the project root through `..`")]
    DotDotEscape(String),
    /// The path lies inside the root as written, but a symlink leads outside.
    #[error("project path `{0}` escapes the project root through a symlink")]
    SymlinkEscape(String),
    /// An absolute path outside every root.
    #[error("project path `{0}` is outside the project root")]
    OutsideRoot(String),
    /// The path is, is inside, or contains a forbidden path.
    #[error("project path `{0}` is forbidden")]
    Forbidden(String),
    /// The canonical project directory a job was admitted with now leads elsewhere (a
    /// component was replaced by a symlink, or moved): found by [`ProjectPolicy::recheck`].
    #[error("project path `{0}` changed since the job was submitted")]
    Changed(String),
    /// A project key that no mapping rule matches.
    #[error("no project mapping matches `{0}`")]
    NoMapping(String),
    /// A forbidden path that is not absolute once `~` is expanded (`~` with `HOME` unset,
    /// `~user/…`, a relative path): it would never match the canonical paths it is compared
    /// with, so it is refused rather than silently protecting nothing.
    #[error("forbidden path `{0}` is not absolute (`~` needs HOME set; `~user` is not expanded)")]
    ForbiddenNotAbsolute(String),
    /// A mapping rule's pattern is not a valid regular expression.
    #[error("invalid mapping pattern `{pattern}`: {reason}")]
    BadPattern {
        /// The pattern.
        pattern: String,
        /// The regex error.
        reason: String,
    },
}

/// The directories jobs may use. Build one with [`ProjectPolicy::builder`].
#[derive(Debug, Clone, Default)]
pub struct ProjectPolicy {
    roots: Vec<PathBuf>,
    forbidden: Vec<PathBuf>,
    mapping: Vec<(Regex, String)>,
}

/// Builder for [`ProjectPolicy`].
#[derive(Debug, Default)]
#[must_use]
pub struct ProjectPolicyBuilder {
    roots: Vec<PathBuf>,
    forbidden: Vec<PathBuf>,
    mapping: Vec<(String, String)>,
}

impl ProjectPolicyBuilder {
    /// Adds a root directory (the first one anchors relative paths).
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.roots.push(root.into());
        self
    }

    /// Forbids a path and everything under it (`~` expands to `$HOME`).
    pub fn forbid(mut self, path: impl Into<PathBuf>) -> Self {
        self.forbidden.push(path.into());
        self
    }

    /// Adds a mapping rule: a key fully matching `pattern` (a regex) maps to `path`; `$1`-style
    /// references to capture groups are expanded. The first matching rule wins.
    pub fn map(mut self, pattern: impl Into<String>, path: impl Into<String>) -> Self {
        self.mapping.push((pattern.into(), path.into()));
        self
    }

    /// Canonicalises the roots (they must exist) and compiles the mapping patterns.
    pub fn build(self) -> Result<ProjectPolicy, PolicyError> {
        let roots = self
            .roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|_| PolicyError::NotFound(r.display().to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let forbidden = self
            .forbidden
            .iter()
            .map(|f| {
                let expanded = match (f.strip_prefix("~"), &home) {
                    (Ok(rest), Some(h)) => h.join(rest),
                    _ => f.clone(),
                };
                if !expanded.is_absolute() {
                    return Err(PolicyError::ForbiddenNotAbsolute(f.display().to_string()));
                }
                // Forbidden paths that exist are compared canonically; others lexically.
                Ok(std::fs::canonicalize(&expanded).unwrap_or(expanded))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mapping = self
            .mapping
            .into_iter()
            .map(|(pattern, path)| {
                Regex::new(&format!("^(?:{pattern})$"))
                    .map(|re| (re, path))
                    .map_err(|e| PolicyError::BadPattern {
                        pattern,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ProjectPolicy {
            roots,
            forbidden,
            mapping,
        })
    }
}

impl ProjectPolicy {
    /// A builder.
    pub fn builder() -> ProjectPolicyBuilder {
        ProjectPolicyBuilder::default()
    }

    /// The canonical roots.
    #[must_use]
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Maps a project key through the rules (first match wins).
    pub fn map_key(&self, key: &str) -> Result<String, PolicyError> {
        for (re, path) in &self.mapping {
            if let Some(caps) = re.captures(key) {
                let mut out = String::new();
                caps.expand(path, &mut out);
                return Ok(out);
            }
        }
        Err(PolicyError::NoMapping(key.to_owned()))
    }

    /// Resolves a job's project: an explicit path wins, then a key through the mapping, then the
    /// first root itself.
    pub fn resolve(&self, path: Option<&str>, key: Option<&str>) -> Result<PathBuf, PolicyError> {
        match (path, key) {
            (Some(p), _) => self.check(p),
            (None, Some(k)) => self.check(&self.map_key(k)?),
            (None, None) => self
                .roots
                .first()
                .cloned()
                .ok_or(PolicyError::NoRoot)
                .and_then(|r| self.check_canonical(&r, &r.display().to_string())),
        }
    }

    /// Checks one path (absolute, or relative to the first root).
    pub fn check(&self, input: &str) -> Result<PathBuf, PolicyError> {
        if input.trim().is_empty() || input.contains('\0') {
            return Err(PolicyError::Malformed);
        }
        let first = self.roots.first().ok_or(PolicyError::NoRoot)?;
        let given = Path::new(input);
        let joined = if given.is_absolute() {
            given.to_path_buf()
        } else {
            first.join(given)
        };
        let lexical = normalize(&joined);
        let lexically_inside = self.roots.iter().any(|r| lexical.starts_with(r));
        let has_dotdot = given.components().any(|c| c == Component::ParentDir);

        let canonical = match std::fs::canonicalize(&joined) {
            Ok(c) => c,
            Err(_) if has_dotdot && !lexically_inside => {
                return Err(PolicyError::DotDotEscape(input.to_owned()))
            }
            Err(_) => return Err(PolicyError::NotFound(input.to_owned())),
        };
        self.refuse_outside_roots(&canonical, lexically_inside, has_dotdot, input)?;
        self.check_canonical(&canonical, input)
    }

    /// Checks again a project directory that [`resolve`](Self::resolve) admitted (its
    /// canonical form), before an agent gets it: it must still lie inside a root, outside
    /// every forbidden path, be a directory, and be its own canonical form (no component of it
    /// was replaced by a symlink since).
    pub fn recheck(&self, canonical: &str) -> Result<(), PolicyError> {
        let path = Path::new(canonical);
        let changed = || PolicyError::Changed(canonical.to_owned());
        // What `resolve` answers is absolute and has no `..`; anything else is checked as any
        // input would be (and is then not its own canonical form).
        if canonical.contains('\0') || !path.is_absolute() || has_dotdot(canonical) {
            let now = self.check(canonical)?;
            return if now.as_os_str() == canonical {
                Ok(())
            } else {
                Err(changed())
            };
        }
        // The same checks as `check` in the same order, without the lexical work an absolute
        // path without `..` does not need (the engine makes this call before every job).
        if self.roots.is_empty() {
            return Err(PolicyError::NoRoot);
        }
        // A directory reached without a symlink, written as `resolve` writes it, is its own
        // canonical form: what follows `canonicalize` below answers as it would (inside a root
        // as written, not forbidden). Anything else, or a kernel that cannot tell, takes the
        // full way, which also says precisely what changed.
        if written_canonically(canonical) && directory_without_symlinks(path) {
            if !self.roots.iter().any(|r| lies_under(canonical, r)) {
                return Err(PolicyError::OutsideRoot(canonical.to_owned()));
            }
            return self.refuse_forbidden_path(path, canonical);
        }
        let now =
            std::fs::canonicalize(path).map_err(|_| PolicyError::NotFound(canonical.to_owned()))?;
        let lexically_inside = self.roots.iter().any(|r| path.starts_with(r));
        self.refuse_outside_roots(&now, lexically_inside, false, canonical)?;
        self.refuse_forbidden(&now, canonical)?;
        if now.as_os_str() != canonical {
            return Err(changed());
        }
        Ok(())
    }

    /// Refuses a canonical path outside every root, saying how `input` got there: through a
    /// symlink (it lay inside lexically), through `..`, or by being elsewhere.
    fn refuse_outside_roots(
        &self,
        canonical: &Path,
        lexically_inside: bool,
        has_dotdot: bool,
        input: &str,
    ) -> Result<(), PolicyError> {
        if self.roots.iter().any(|r| canonical.starts_with(r)) {
            return Ok(());
        }
        Err(if lexically_inside {
            PolicyError::SymlinkEscape(input.to_owned())
        } else if has_dotdot {
            PolicyError::DotDotEscape(input.to_owned())
        } else {
            PolicyError::OutsideRoot(input.to_owned())
        })
    }

    fn check_canonical(&self, canonical: &Path, input: &str) -> Result<PathBuf, PolicyError> {
        self.refuse_forbidden(canonical, input)?;
        Ok(canonical.to_path_buf())
    }

    /// Refuses a canonical path that is forbidden or not a directory.
    fn refuse_forbidden(&self, canonical: &Path, input: &str) -> Result<(), PolicyError> {
        self.refuse_forbidden_path(canonical, input)?;
        if !canonical.is_dir() {
            return Err(PolicyError::NotADirectory(input.to_owned()));
        }
        Ok(())
    }

    /// Refuses a canonical path that is, is inside, or contains a forbidden path (a project
    /// of `$HOME` would hand `~/.ssh` to the agent).
    fn refuse_forbidden_path(&self, canonical: &Path, input: &str) -> Result<(), PolicyError> {
        if self
            .forbidden
            .iter()
            .any(|f| canonical.starts_with(f) || f.starts_with(canonical))
        {
            return Err(PolicyError::Forbidden(input.to_owned()));
        }
        Ok(())
    }
}

/// Whether `path` (absolute) has a `..` component, read from its bytes.
fn has_dotdot(path: &str) -> bool {
    path.split('/').any(|c| c == "..")
}

/// Whether `path` (absolute, without `..`) is written as `canonicalize` writes paths: no `.`
/// component, no doubled `/`, no `/` at the end (but `/` itself). Read from its bytes, without
/// the allocation and the component walk of comparing it with its `normalize`d form.
fn written_canonically(path: &str) -> bool {
    path == "/"
        || path
            .strip_prefix('/')
            .is_some_and(|rest| rest.split('/').all(|c| !c.is_empty() && c != "."))
}

/// Whether `path` is `root` or lies under it, both written canonically (see
/// [`written_canonically`]; a root is canonicalised when the policy is built): what
/// `Path::starts_with` answers for them, read from their bytes.
fn lies_under(path: &str, root: &Path) -> bool {
    let root = root.as_os_str().as_encoded_bytes();
    let path = path.as_bytes();
    path.starts_with(root)
        && (path.len() == root.len() || root.ends_with(b"/") || path[root.len()] == b'/')
}

/// Whether `path` opens as a directory without following a symlink on the way (`openat2`
/// with `RESOLVE_NO_SYMLINKS`, Linux 5.6): one walk of the path, where `realpath` reads every
/// component's link, each a walk from the root, and `is_dir` makes another. `false` whenever
/// the answer is not a plain yes: a symlink, a missing or non-directory component, no
/// permission, or a kernel (or seccomp filter) without `openat2`.
#[cfg(target_os = "linux")]
fn directory_without_symlinks(path: &Path) -> bool {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    match openat2(nix::libc::AT_FDCWD, path, how) {
        Ok(fd) => {
            // An `O_PATH` descriptor: closing it cannot lose data.
            let _ = nix::unistd::close(fd);
            true
        }
        Err(_) => false,
    }
}

#[cfg(not(target_os = "linux"))]
fn directory_without_symlinks(_path: &Path) -> bool {
    false
}

/// Removes `.` and folds `..` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(tmp.path()).unwrap();
        let root = base.join("root");
        let outside = base.join("outside");
        fs::create_dir_all(root.join("repo/sub")).unwrap();
        fs::create_dir_all(root.join("secret")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(root.join("file.txt"), "x").unwrap();
        symlink(&outside, root.join("escape")).unwrap();
        symlink(root.join("repo"), root.join("alias")).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            outside,
        }
    }

    fn policy(f: &Fixture) -> ProjectPolicy {
        ProjectPolicy::builder()
            .root(&f.root)
            .forbid(f.root.join("secret"))
            .map("org/(.+)", "$1")
            .map("special", "repo/sub")
            .map(".*", "repo")
            .build()
            .unwrap()
    }

    #[test]
    fn accepts_paths_inside_the_root() {
        let f = fixture();
        let p = policy(&f);
        assert_eq!(p.check("repo").unwrap(), f.root.join("repo"));
        assert_eq!(p.check("repo/sub/..").unwrap(), f.root.join("repo"));
        assert_eq!(
            p.check(f.root.join("repo/sub").to_str().unwrap()).unwrap(),
            f.root.join("repo/sub")
        );
        // A symlink that stays inside is fine and resolves to its target.
        assert_eq!(p.check("alias").unwrap(), f.root.join("repo"));
        // The root itself holds the forbidden `secret`: it is no project.
        assert!(matches!(
            p.resolve(None, None),
            Err(PolicyError::Forbidden(_))
        ));
    }

    #[test]
    fn each_refusal_is_distinct() {
        let f = fixture();
        let p = policy(&f);
        assert!(matches!(
            p.check("../outside"),
            Err(PolicyError::DotDotEscape(_))
        ));
        assert!(matches!(
            p.check("repo/../../outside"),
            Err(PolicyError::DotDotEscape(_))
        ));
        assert!(matches!(
            p.check("../nowhere"),
            Err(PolicyError::DotDotEscape(_))
        ));
        assert!(matches!(
            p.check("escape"),
            Err(PolicyError::SymlinkEscape(_))
        ));
        assert!(matches!(
            p.check(f.outside.to_str().unwrap()),
            Err(PolicyError::OutsideRoot(_))
        ));
        assert!(matches!(p.check("/etc"), Err(PolicyError::OutsideRoot(_))));
        assert!(matches!(p.check("secret"), Err(PolicyError::Forbidden(_))));
        assert!(matches!(p.check("missing"), Err(PolicyError::NotFound(_))));
        assert!(matches!(
            p.check("file.txt"),
            Err(PolicyError::NotADirectory(_))
        ));
        assert!(matches!(p.check(""), Err(PolicyError::Malformed)));
        assert!(matches!(p.check("a\0b"), Err(PolicyError::Malformed)));
        let none = ProjectPolicy::builder().build().unwrap();
        assert_eq!(none.check("x"), Err(PolicyError::NoRoot));
        assert_eq!(none.resolve(None, None), Err(PolicyError::NoRoot));
    }

    #[test]
    fn mapping_first_match_wins_with_fallback() {
        let f = fixture();
        let p = policy(&f);
        assert_eq!(p.map_key("org/repo").unwrap(), "repo");
        assert_eq!(p.map_key("special").unwrap(), "repo/sub");
        assert_eq!(p.map_key("anything").unwrap(), "repo");
        assert_eq!(
            p.resolve(None, Some("org/repo")).unwrap(),
            f.root.join("repo")
        );
        assert!(matches!(
            p.resolve(None, Some("org/escape")),
            Err(PolicyError::SymlinkEscape(_))
        ));
        let strict = ProjectPolicy::builder()
            .root(&f.root)
            .map("org/repo", "repo")
            .build()
            .unwrap();
        assert!(matches!(
            strict.map_key("org/repo2"),
            Err(PolicyError::NoMapping(_))
        ));
        assert!(matches!(
            ProjectPolicy::builder().map("(", "x").build(),
            Err(PolicyError::BadPattern { .. })
        ));
    }

    #[test]
    fn missing_root_is_refused_at_build() {
        assert!(matches!(
            ProjectPolicy::builder()
                .root("/definitely/not/here")
                .build(),
            Err(PolicyError::NotFound(_))
        ));
    }

    #[test]
    fn a_path_that_contains_a_forbidden_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().canonicalize().unwrap();
        fs::create_dir_all(home.join(".ssh")).unwrap();
        fs::create_dir_all(home.join("code/app")).unwrap();
        let p = ProjectPolicy::builder()
            .root(&home)
            .forbid(home.join(".ssh"))
            .build()
            .unwrap();
        // The root itself holds `.ssh`: refused, as is `.ssh`; a project beside it is fine.
        assert!(matches!(
            p.resolve(None, None),
            Err(PolicyError::Forbidden(_))
        ));
        assert!(matches!(p.check(".ssh"), Err(PolicyError::Forbidden(_))));
        assert_eq!(p.check("code/app").unwrap(), home.join("code/app"));
    }

    #[test]
    fn a_forbidden_path_that_is_not_absolute_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        // Relative, or `~user` (never expanded): compared with canonical paths, neither would
        // ever match, so the rule would protect nothing.
        for f in ["secrets", "~alice/.ssh", "./.ssh"] {
            let e = ProjectPolicy::builder()
                .root(tmp.path())
                .forbid(f)
                .build()
                .unwrap_err();
            assert_eq!(e, PolicyError::ForbiddenNotAbsolute(f.into()), "{f}");
        }
        assert!(ProjectPolicy::builder()
            .root(tmp.path())
            .forbid("/etc")
            .build()
            .is_ok());
    }

    /// What `resolve` admitted is checked again before an agent gets it: unchanged, it
    /// passes; replaced by a symlink (leading out of the root, or to another project inside
    /// it), or removed, it is refused, each with its reason.
    #[test]
    fn a_recheck_refuses_an_admitted_directory_that_changed_since() {
        let f = fixture();
        let p = policy(&f);
        let admitted = p.check("repo/sub").unwrap();
        let admitted = admitted.to_str().unwrap();
        p.recheck(admitted).unwrap();

        // Swapped for a symlink out of the root.
        fs::rename(f.root.join("repo/sub"), f.root.join("repo/moved")).unwrap();
        symlink(&f.outside, f.root.join("repo/sub")).unwrap();
        assert!(matches!(
            p.recheck(admitted),
            Err(PolicyError::SymlinkEscape(_))
        ));
        // For a symlink to another directory inside the root: not the project admitted.
        fs::remove_file(f.root.join("repo/sub")).unwrap();
        symlink(f.root.join("repo/moved"), f.root.join("repo/sub")).unwrap();
        assert_eq!(
            p.recheck(admitted),
            Err(PolicyError::Changed(admitted.to_owned()))
        );
        // Gone.
        fs::remove_file(f.root.join("repo/sub")).unwrap();
        assert!(matches!(p.recheck(admitted), Err(PolicyError::NotFound(_))));
        // A forbidden path never passes, however it was stored.
        assert!(matches!(
            p.recheck(f.root.join("secret").to_str().unwrap()),
            Err(PolicyError::Forbidden(_))
        ));
        // Nor does one outside every root, or a form `resolve` never answers (relative, with
        // `..`), even when it leads to an admitted directory.
        assert!(matches!(
            p.recheck(f.outside.to_str().unwrap()),
            Err(PolicyError::OutsideRoot(_))
        ));
        // A directory whose name only begins with the root's is not inside it.
        let beside = format!("{}-beside", f.root.display());
        fs::create_dir(&beside).unwrap();
        assert_eq!(
            p.recheck(&beside),
            Err(PolicyError::OutsideRoot(beside.clone()))
        );
        let moved = f.root.join("repo/moved");
        assert!(p.recheck(moved.to_str().unwrap()).is_ok());
        assert_eq!(
            p.recheck("repo/moved"),
            Err(PolicyError::Changed("repo/moved".to_owned()))
        );
        let dotted = format!("{}/../repo/moved", f.root.join("repo").display());
        assert_eq!(
            p.recheck(&dotted),
            Err(PolicyError::Changed(dotted.clone()))
        );
        let file = f.root.join("repo/moved/file");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            p.recheck(file.to_str().unwrap()),
            Err(PolicyError::NotADirectory(_))
        ));
        // A form with `.`, a doubled or a trailing `/` opens as the same directory, but it is
        // not what `resolve` answers.
        let root = f.root.display();
        for odd in [
            format!("{root}/./repo/moved"),
            format!("{root}/repo//moved"),
            format!("{root}/repo/moved/"),
        ] {
            assert_eq!(p.recheck(&odd), Err(PolicyError::Changed(odd.clone())));
        }
    }

    /// The recheck's lexical shortcuts answer what `Path`'s component walk answers.
    #[test]
    fn the_lexical_shortcuts_read_paths_as_components_do() {
        for (path, canonical) in [
            ("/", true),
            ("/srv", true),
            ("/srv/a b/c", true),
            ("/srv/...", true),
            ("/srv/", false),
            ("/srv//a", false),
            ("/srv/./a", false),
            ("/srv/.", false),
            ("//srv", false),
        ] {
            assert_eq!(written_canonically(path), canonical, "{path}");
            if canonical {
                assert_eq!(normalize(Path::new(path)).as_os_str(), path, "{path}");
            }
        }
        for path in ["/srv/..", "/srv/../a", "/../srv"] {
            assert!(has_dotdot(path), "{path}");
        }
        for path in ["/srv/...", "/srv/..a", "/srv/a.."] {
            assert!(!has_dotdot(path), "{path}");
        }
        for (path, root, under) in [
            ("/srv/a", "/srv/a", true),
            ("/srv/a/b", "/srv/a", true),
            ("/srv/ab", "/srv/a", false),
            ("/srv", "/srv/a", false),
            ("/srv/a", "/", true),
        ] {
            assert_eq!(
                lies_under(path, Path::new(root)),
                under,
                "{path} under {root}"
            );
            assert_eq!(
                Path::new(path).starts_with(root),
                under,
                "{path} under {root}"
            );
        }
    }

    /// The recheck's one-walk test: yes for a directory reached without a symlink, no for one
    /// reached through a symlink, for a file and for nothing. (Linux from 5.6; elsewhere it
    /// always says no and the recheck takes `canonicalize`'s way.)
    #[test]
    fn the_one_walk_test_sees_a_symlink_on_the_way() {
        let f = fixture();
        let dir = f.root.join("repo/sub");
        fs::write(dir.join("file"), "x").unwrap();
        if !directory_without_symlinks(&dir) {
            assert!(
                !cfg!(target_os = "linux") || std::env::var_os("CI").is_none(),
                "openat2 refused a plain directory"
            );
            eprintln!("skipping: no openat2 here (the recheck takes canonicalize's way)");
            return;
        }
        // `alias` is a symlink to `repo`.
        assert!(!directory_without_symlinks(&f.root.join("alias/sub")));
        assert!(!directory_without_symlinks(&f.root.join("alias")));
        assert!(!directory_without_symlinks(&f.root.join("escape")));
        assert!(!directory_without_symlinks(&dir.join("file")));
        assert!(!directory_without_symlinks(&dir.join("missing")));
    }
}
