//! Where entries live: the shared store (Redis, every replica serves every entry) or, without
//! one, this replica's memory, an LRU bounded in bytes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashlink::LruCache;
use parking_lot::Mutex;
use tokio::runtime::RuntimeFlavor;
use tokio::sync::oneshot;

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
///
/// A worker's writes wait (at most `WRITE_DELAY`) to go with its next lookup, in one pipeline:
/// a miss then costs the store one round trip, not two. Written apart, the `SET` after each
/// answer woke the store, the worker and the next caller's lookup an extra time, and at
/// concurrency 1 on two cores that cost more than the lookup itself (README, Response cache).
#[derive(Clone)]
pub struct SharedStore {
    store: Store,
    /// Tells this store's per-worker connections from another's (tests run several).
    id: u64,
}

/// The longest a worker's write waits for a lookup to go with: another replica may miss an
/// entry this much longer than it would otherwise.
const WRITE_DELAY: Duration = Duration::from_millis(2);
/// Writes waiting past this many, or this many bytes, go out at once.
const MAX_WAITING: usize = 64;
const MAX_WAITING_BYTES: usize = 1 << 20;

/// A write waiting for the worker's next command; told how it went.
struct Waiting {
    key: String,
    value: Bytes,
    ttl_ms: u64,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// One worker's connection to a shared store and its waiting writes.
struct Lane {
    id: u64,
    store: Store,
    waiting: Vec<Waiting>,
}

thread_local! {
    /// This thread's connections, by `SharedStore::id` (one, but for tests).
    static HERE: RefCell<Vec<Lane>> = const { RefCell::new(Vec::new()) };
}

impl SharedStore {
    /// Whether this thread is a data-plane worker (a single-threaded runtime).
    fn on_worker() -> bool {
        tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
    }

    /// The store to use on this thread: the worker's own connection on a single-threaded runtime
    /// (made on first use), the start-up one elsewhere.
    fn connection(&self) -> Store {
        if !Self::on_worker() {
            return self.store.clone();
        }
        self.with_lane(|lane| lane.store.clone())
    }

    /// This thread's connection, and the worker's waiting writes, taken to go with a command.
    fn here(&self) -> (Store, Vec<Waiting>) {
        if !Self::on_worker() {
            return (self.store.clone(), Vec::new());
        }
        self.with_lane(|lane| (lane.store.clone(), std::mem::take(&mut lane.waiting)))
    }

    fn with_lane<T>(&self, f: impl FnOnce(&mut Lane) -> T) -> T {
        HERE.with(|here| {
            let mut here = here.borrow_mut();
            let at = match here.iter().position(|lane| lane.id == self.id) {
                Some(at) => at,
                None => {
                    here.push(Lane {
                        id: self.id,
                        store: self.store.reopen(),
                        waiting: Vec::new(),
                    });
                    here.len() - 1
                }
            };
            f(&mut here[at])
        })
    }

    /// Sends `waiting` (and `then`, a lookup, last) in one pipeline; tells each write how it went.
    async fn send(
        store: &Store,
        waiting: Vec<Waiting>,
        then: Option<&str>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if waiting.is_empty() {
            let Some(key) = then else { return Ok(None) };
            return store.query(redis::cmd("GET").arg(key)).await;
        }
        let mut pipe = redis::pipe();
        for w in &waiting {
            pipe.cmd("SET")
                .arg(&w.key)
                .arg(w.value.as_ref())
                .arg("PX")
                .arg(w.ttl_ms)
                .ignore();
        }
        let result = match then {
            Some(key) => {
                pipe.cmd("GET").arg(key);
                store
                    .pipeline::<(Option<Vec<u8>>,)>(&pipe)
                    .await
                    .map(|(v,)| v)
            }
            None => store.pipeline::<()>(&pipe).await.map(|()| None),
        };
        let outcome = result.as_ref().map(|_| ()).map_err(Clone::clone);
        for w in waiting {
            let _ = w.done.send(outcome.clone());
        }
        result
    }

    /// Queues a write for the worker's next command; the first one waiting sends them all after
    /// `WRITE_DELAY` if no lookup took them before.
    fn queue(&self, write: Waiting) {
        let (first, full) = self.with_lane(|lane| {
            lane.waiting.push(write);
            let bytes: usize = lane.waiting.iter().map(|w| w.value.len()).sum();
            (
                lane.waiting.len() == 1,
                lane.waiting.len() >= MAX_WAITING || bytes >= MAX_WAITING_BYTES,
            )
        });
        if !(first || full) {
            return;
        }
        // Spawned on this worker, so it finds this worker's lane (empty if a lookup took it).
        let shared = self.clone();
        let flush = async move {
            let (store, waiting) = shared.here();
            let _ = SharedStore::send(&store, waiting, None).await;
        };
        if full {
            tokio::spawn(flush);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(WRITE_DELAY).await;
                flush.await;
            });
        }
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
                let (store, waiting) = shared.here();
                let key = format!("{PREFIX}{key}");
                let value = SharedStore::send(&store, waiting, Some(&key)).await?;
                Ok(value.map(Bytes::from))
            }
        }
    }

    pub async fn put(&self, key: &str, value: Bytes, ttl: Duration) -> Result<Written, StoreError> {
        match self {
            CacheStore::Local(local) => Ok(local.put(key, value, ttl, Instant::now())),
            CacheStore::Shared(shared) => {
                let key = format!("{PREFIX}{key}");
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                if !SharedStore::on_worker() || shared.store.is_cluster() {
                    // Written at once, on this thread's connection: a Cluster's pipeline would
                    // cross slots, and off a worker no lookup comes along.
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(key).arg(value.as_ref()).arg("PX").arg(ttl_ms);
                    shared.connection().query::<()>(&cmd).await?;
                    return Ok(Written::default());
                }
                let (done, sent) = oneshot::channel();
                shared.queue(Waiting {
                    key,
                    value,
                    ttl_ms,
                    done,
                });
                // The deadline runs from the send; a write that never went is a timeout.
                sent.await.unwrap_or(Err(StoreError::Timeout))?;
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
        assert!(main.block_on(async { a.connection().same_connection(&a.store) }));
        let worker = || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (first, again) = (a.connection(), a.connection());
                assert!(first.same_connection(&again), "kept for the thread");
                assert!(!first.same_connection(&a.store), "not the start-up one");
                assert!(
                    !first.same_connection(&b.connection()),
                    "one per cache store"
                );
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
