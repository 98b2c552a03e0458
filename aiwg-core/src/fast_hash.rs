//! The hasher of the maps on the engine's and the memory store's hot paths (`foldhash`'s, which
//! `hashbrown` uses by default), instead of the standard library's SipHash.
//!
//! Their keys are job ids (made here) and the project paths and concurrency groups of admitted
//! jobs, hashed several times a job (the memory store's lanes and running counts, the engine's
//! running jobs): SipHash was about 4 % of the instructions of an API trigger request
//! (BENCHMARKS.md, session 18). The seed is still random per process, so keys cannot be chosen
//! to collide by someone who does not see the process's memory.

/// A `HashMap` with the fast hasher.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with the fast hasher.
pub(crate) type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
