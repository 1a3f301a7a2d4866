//! Where entries live: the shared store (Redis, every replica serves every entry) or, without
//! one, this replica's memory, an LRU bounded in bytes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashlink::LruCache;
use parking_lot::Mutex;
use tokio::runtime::RuntimeFlavor;

use crate::store::{Store, StoreError};

/// The start of every cache key in the shared store. No hash tag: each entry is one key, read
/// and written alone, so a Cluster spreads entries over all its slots.
const PREFIX: &str = "portcullis:cache:";

pub enum CacheStore {
    Local(LocalStore),
    Shared(SharedStore),
}

/// The shared store, reached from each data-plane worker through a connection of the worker's
/// own. A connection's task runs on the runtime that made it: through the one made at start-up,
/// every lookup of a worker (a single-threaded runtime) would wake the main runtime's thread and
/// be woken back, two thread hops that cost more than the store's round trip itself.
pub struct SharedStore {
    store: Store,
    /// Tells this store's per-worker connections from another's (tests run several).
    id: u64,
}

thread_local! {
    /// This thread's connections, by `SharedStore::id` (one, but for tests).
    static HERE: RefCell<Vec<(u64, Store)>> = const { RefCell::new(Vec::new()) };
}

impl SharedStore {
    /// The store to use on this thread: the worker's own connection on a single-threaded runtime
    /// (made on first use), the start-up one elsewhere.
    fn here(&self) -> Store {
        let worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread);
        if !worker {
            return self.store.clone();
        }
        HERE.with(|here| {
            let mut here = here.borrow_mut();
            if let Some((_, store)) = here.iter().find(|(id, _)| *id == self.id) {
                return store.clone();
            }
            let store = self.store.reopen();
            here.push((self.id, store.clone()));
            store
        })
    }
}

/// What a write did to the store, for the metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Entries evicted to make room (local store only; Redis evicts by its own policy).
    pub evicted: u64,
}

impl CacheStore {
    pub fn shared(store: Store) -> CacheStore {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        CacheStore::Shared(SharedStore {
            store,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            CacheStore::Local(_) => "local",
            CacheStore::Shared(_) => "redis",
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            CacheStore::Local(local) => Ok(local.get(key, Instant::now())),
            CacheStore::Shared(shared) => {
                let mut cmd = redis::cmd("GET");
                cmd.arg(format!("{PREFIX}{key}"));
                let value: Option<Vec<u8>> = shared.here().query(&cmd).await?;
                Ok(value.map(Bytes::from))
            }
        }
    }

    pub async fn put(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Written, StoreError> {
        match self {
            CacheStore::Local(local) => Ok(local.put(key, value, ttl, Instant::now())),
            CacheStore::Shared(shared) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!("{PREFIX}{key}"))
                    .arg(value.as_ref())
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64);
                shared.here().query::<()>(&cmd).await?;
                Ok(Written::default())
            }
        }
    }

    /// Bytes held now (local store only).
    pub fn held_bytes(&self) -> Option<usize> {
        match self {
            CacheStore::Local(local) => Some(local.inner.lock().bytes),
            CacheStore::Shared(_) => None,
        }
    }
}

/// This replica's entries: least recently used first out once `capacity` bytes are held.
pub struct LocalStore {
    capacity: usize,
    inner: Mutex<Lru>,
}

struct Lru {
    map: LruCache<Box<str>, (Bytes, Instant)>,
    bytes: usize,
}

/// What one entry costs the local store beyond its bytes (key, links, expiry).
const ENTRY_OVERHEAD: usize = 128;

impl LocalStore {
    pub fn new(capacity: usize) -> LocalStore {
        LocalStore {
            capacity,
            inner: Mutex::new(Lru {
                map: LruCache::new_unbounded(),
                bytes: 0,
            }),
        }
    }

    fn get(&self, key: &str, now: Instant) -> Option<Bytes> {
        let mut lru = self.inner.lock();
        let (value, expires) = lru.map.get(key)?;
        if *expires > now {
            return Some(value.clone());
        }
        if let Some((value, _)) = lru.map.remove(key) {
            lru.bytes -= cost(key, &value);
        }
        None
    }

    fn put(&self, key: &str, value: Bytes, ttl: Duration, now: Instant) -> Written {
        let size = cost(key, &value);
        let mut written = Written::default();
        if size > self.capacity {
            return written;
        }
        let mut lru = self.inner.lock();
        if let Some((old, _)) = lru.map.insert(key.into(), (value, now + ttl)) {
            lru.bytes -= cost(key, &old);
        }
        lru.bytes += size;
        while lru.bytes > self.capacity {
            let Some((k, (v, _))) = lru.map.remove_lru() else {
                break;
            };
            lru.bytes -= cost(&k, &v);
            written.evicted += 1;
        }
        written
    }
}

fn cost(key: &str, value: &Bytes) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_single_threaded_runtime_has_its_own_connection_and_keeps_it() {
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Nothing listens on port 1: no connection comes up, none is needed to tell them apart.
        let args = crate::store::StoreArgs::default();
        let (a, b) = main.block_on(async {
            let store = Store::open(&args, "redis://127.0.0.1:1").unwrap();
            (CacheStore::shared(store.clone()), CacheStore::shared(store))
        });
        let (CacheStore::Shared(a), CacheStore::Shared(b)) = (a, b) else {
            panic!()
        };
        assert!(main.block_on(async { a.here().same_connection(&a.store) }));
        let worker = || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (first, again) = (a.here(), a.here());
                assert!(first.same_connection(&again), "kept for the thread");
                assert!(!first.same_connection(&a.store), "not the start-up one");
                assert!(!first.same_connection(&b.here()), "one per cache store");
                first
            })
        };
        let (one, two) = std::thread::scope(|s| {
            let one = s.spawn(worker);
            let two = s.spawn(worker);
            (one.join().unwrap(), two.join().unwrap())
        });
        assert!(!one.same_connection(&two), "one per worker");
    }

    #[test]
    fn the_local_store_expires_and_evicts_the_least_recently_used_by_bytes() {
        let store = LocalStore::new(3 * (1 + 100 + ENTRY_OVERHEAD));
        let now = Instant::now();
        let v = Bytes::from(vec![0u8; 100]);
        let ttl = Duration::from_secs(10);
        for k in ["a", "b", "c"] {
            assert_eq!(store.put(k, v.clone(), ttl, now).evicted, 0);
        }
        assert!(store.get("a", now).is_some(), "a is now the most recent");
        assert_eq!(store.put("d", v.clone(), ttl, now).evicted, 1);
        assert!(store.get("b", now).is_none(), "b was the least recent");
        assert!(store.get("a", now).is_some());
        assert!(store.get("a", now + ttl).is_none(), "expired");
        assert_eq!(store.inner.lock().bytes, 2 * (1 + 100 + ENTRY_OVERHEAD));
        // Larger than the whole store: not kept.
        let huge = Bytes::from(vec![0u8; 4000]);
        assert_eq!(store.put("e", huge, ttl, now), Written::default());
        assert!(store.get("e", now).is_none());
    }
}
