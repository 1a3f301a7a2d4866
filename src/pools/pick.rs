//! Choosing an endpoint of a pool for one call, pure: queue and KV-cache load, prompt-prefix
//! affinity (reuse the KV cache of the endpoint that served the same long prefix) and LoRA
//! affinity (an endpoint with the adapter loaded), as the Inference Extension's reference picker
//! scores them; saturated endpoints are left out, and a pool whose endpoints all are takes no call.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use crate::llm::LlmRequest;

/// One endpoint as the picker sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figures {
    /// Requests waiting (reported, plus the gateway's calls since the report).
    pub waiting: u32,
    /// Waiting plus running: the queue the call joins.
    pub load: u32,
    /// 0 to 1.
    pub kv_cache: f64,
    /// The call's LoRA adapter is loaded there.
    pub adapter_loaded: bool,
    /// It may load one more adapter.
    pub adapter_room: bool,
    /// The figures are old (failed scrapes): only the gateway's own calls are known.
    pub stale: bool,
}

/// An endpoint the call may go to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub figures: Figures,
    /// Share of the call's prompt prefix this endpoint served last (0 to 1).
    pub prefix: f64,
}

/// Requests waiting above which an endpoint is too busy for prefix affinity to send it more,
/// when the backend sets no `saturation` (the reference picker's queue threshold).
pub const AFFINITY_QUEUE_LIMIT: u32 = 5;
/// KV-cache usage above which affinity no longer holds (the cache is about to evict anyway).
const AFFINITY_KV_LIMIT: f64 = 0.9;

/// Index into `candidates` of the endpoint for the call; `None` when every one is saturated
/// (waiting above `saturation`), so the pool cannot take it. Lower score wins: queue (relative
/// to the busiest) plus KV-cache usage, less the prefix share (doubled: reusing a long cached
/// prefix is worth more than an empty queue) and a LoRA bonus, both only while the endpoint is
/// below the affinity limit; ties are broken at random so idle endpoints share the calls.
pub fn choose(candidates: &[Candidate], saturation: Option<u32>, roll: u64) -> Option<usize> {
    let open = |c: &Candidate| saturation.is_none_or(|limit| c.figures.waiting <= limit);
    let busiest = candidates
        .iter()
        .filter(|c| open(c))
        .map(|c| c.figures.load)
        .max()?;
    let affinity_limit = saturation.unwrap_or(AFFINITY_QUEUE_LIMIT);
    let score = |c: &Candidate| {
        let f = &c.figures;
        let mut s = f64::from(f.load) / f64::from(busiest.max(1)) + f.kv_cache;
        let hot = f.waiting > affinity_limit || f.kv_cache > AFFINITY_KV_LIMIT;
        if !hot {
            s -= 2.0 * c.prefix;
            // Like the reference picker's LoRA filter: an endpoint with the adapter loaded wins
            // over any load short of saturation (loading it elsewhere costs more).
            if f.adapter_loaded {
                s -= 2.0;
            }
        }
        if !f.adapter_loaded && f.adapter_room {
            s -= 0.5;
        }
        s
    };
    let scored: Vec<(usize, f64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| open(c))
        .map(|(i, c)| (i, score(c)))
        .collect();
    let best = scored.iter().map(|(_, s)| *s).fold(f64::INFINITY, f64::min);
    let ties: Vec<usize> = scored
        .iter()
        .filter(|(_, s)| *s <= best + 1e-9)
        .map(|(i, _)| *i)
        .collect();
    ties.get((roll % ties.len().max(1) as u64) as usize)
        .copied()
}

/// Prompt bytes per prefix block: about 64 tokens, the reference picker's block size.
pub const BLOCK: usize = 256;
/// At most this many blocks are hashed per call (the first 32 KiB of the prompt).
pub const MAX_BLOCKS: usize = 128;

/// Chained hashes of the prompt's full blocks: block k's hash covers blocks 0..=k, so equal
/// hashes mean equal prefixes. Empty for prompts shorter than one block (no affinity).
pub fn prefix_blocks(request: &LlmRequest) -> Vec<u64> {
    let mut text = String::new();
    let cap = BLOCK * MAX_BLOCKS;
    match request {
        LlmRequest::Chat(c) => {
            for m in &c.messages {
                if text.len() >= cap {
                    break;
                }
                text.push_str(m.role.as_str());
                text.push('\n');
                text.push_str(&m.text());
                text.push('\n');
            }
        }
        LlmRequest::Completions(c) => text.push_str(&c.prompt),
        LlmRequest::Embeddings(_) | LlmRequest::Native(_) => {}
    }
    let bytes = &text.as_bytes()[..text.len().min(cap)];
    let mut hashes = Vec::with_capacity(bytes.len() / BLOCK);
    let mut previous = 0u64;
    for block in bytes.chunks_exact(BLOCK) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        previous.hash(&mut h);
        block.hash(&mut h);
        previous = h.finish();
        hashes.push(previous);
    }
    hashes
}

/// Which endpoint last served each prefix block, bounded: two generations of at most
/// `GENERATION` entries each, the older dropped when the newer fills.
#[derive(Default)]
pub struct PrefixIndex {
    generations: parking_lot::Mutex<[HashMap<u64, SocketAddr>; 2]>,
}

const GENERATION: usize = 50_000;

impl PrefixIndex {
    /// The endpoint that served the longest known prefix of `blocks`, and the share of `blocks`
    /// it covers.
    pub fn longest(&self, blocks: &[u64]) -> Option<(SocketAddr, f64)> {
        if blocks.is_empty() {
            return None;
        }
        let maps = self.generations.lock();
        blocks.iter().enumerate().rev().find_map(|(i, h)| {
            let at = maps[0].get(h).or_else(|| maps[1].get(h))?;
            Some((*at, (i + 1) as f64 / blocks.len() as f64))
        })
    }

    /// `endpoint` now holds these blocks in its cache.
    pub fn served(&self, blocks: &[u64], endpoint: SocketAddr) {
        if blocks.is_empty() {
            return;
        }
        let mut maps = self.generations.lock();
        if maps[0].len() + blocks.len() > GENERATION {
            maps[1] = std::mem::take(&mut maps[0]);
        }
        for h in blocks {
            maps[0].insert(*h, endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatMessage, ChatRequest, Content, Role};

    fn idle() -> Figures {
        Figures {
            waiting: 0,
            load: 0,
            kv_cache: 0.0,
            adapter_loaded: false,
            adapter_room: false,
            stale: false,
        }
    }

    fn c(waiting: u32, running: u32, kv: f64) -> Candidate {
        Candidate {
            figures: Figures {
                waiting,
                load: waiting + running,
                kv_cache: kv,
                ..idle()
            },
            prefix: 0.0,
        }
    }

    #[test]
    fn the_least_loaded_endpoint_wins() {
        let list = [c(3, 4, 0.6), c(0, 1, 0.1), c(1, 4, 0.5)];
        for roll in 0..50 {
            assert_eq!(choose(&list, None, roll), Some(1));
        }
    }

    #[test]
    fn idle_endpoints_share_the_calls() {
        let list = [c(0, 0, 0.0), c(0, 0, 0.0), c(0, 0, 0.0)];
        let mut seen = [0; 3];
        for roll in 0..300u64 {
            seen[choose(&list, None, fastrand::u64(..) ^ roll).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn a_shared_prefix_sticks_unless_that_endpoint_is_saturated() {
        let mut list = [c(1, 2, 0.3), c(0, 1, 0.1)];
        list[0].prefix = 1.0;
        assert_eq!(choose(&list, None, 7), Some(0));
        list[0].figures.waiting = AFFINITY_QUEUE_LIMIT + 1;
        list[0].figures.load = AFFINITY_QUEUE_LIMIT + 3;
        assert_eq!(choose(&list, None, 7), Some(1));
    }

    #[test]
    fn a_lora_call_prefers_the_endpoint_with_its_adapter() {
        let mut list = [c(0, 0, 0.0), c(1, 3, 0.2)];
        list[1].figures.adapter_loaded = true;
        assert_eq!(choose(&list, None, 1), Some(1));
        list[1].figures.waiting = AFFINITY_QUEUE_LIMIT + 1;
        assert_eq!(choose(&list, None, 1), Some(0));
    }

    #[test]
    fn all_saturated_takes_no_call() {
        let list = [c(9, 4, 0.9), c(6, 4, 0.9)];
        assert_eq!(choose(&list, Some(5), 0), None);
        assert_eq!(choose(&list, Some(6), 0), Some(1));
        assert_eq!(choose(&list, None, 0), Some(1));
        assert_eq!(choose(&[], None, 0), None);
    }

    fn chat(system: &str, user: &str) -> LlmRequest {
        let msg = |role: &str, text: &str| ChatMessage::new(Role::parse(role), Content::text(text));
        LlmRequest::Chat(ChatRequest {
            messages: vec![msg("system", system), msg("user", user)],
            params: Default::default(),
            stream: Default::default(),
            extra: Default::default(),
        })
    }

    #[test]
    fn prefixes_are_chained_block_hashes() {
        let long = "You are a careful assistant. ".repeat(40);
        let a = prefix_blocks(&chat(&long, "first question"));
        let b = prefix_blocks(&chat(&long, "another, different question"));
        assert!(a.len() >= 4);
        let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        assert!(shared >= long.len() / BLOCK, "{shared}");
        assert!(prefix_blocks(&chat("short", "hi")).is_empty());
        let index = PrefixIndex::default();
        let here: SocketAddr = "127.0.0.9:80".parse().unwrap();
        index.served(&a, here);
        let (at, share) = index.longest(&b).unwrap();
        assert_eq!(at, here);
        assert!(share > 0.5 && share <= 1.0, "{share}");
        let other = prefix_blocks(&chat(&"Something else entirely. ".repeat(40), "q"));
        assert_eq!(index.longest(&other), None);
    }
}
