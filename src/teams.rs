//! Teams as the data plane sees them: each caller's teams found by one map lookup per identity key,
//! built with the routing table (never per request).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::access::Identity;
use crate::api::{AccessRule, Limit};
use crate::store::KeyPrefix;

/// One Team, ready to enforce.
#[derive(Debug)]
pub struct TeamEntry {
    pub name: String,
    pub limits: Vec<Limit>,
    /// The start of its limits' counter keys (`limits::team_keys`).
    pub counter_keys: KeyPrefix,
    /// `namespace/name` of the only routes members may call; `None`: any.
    pub routes: Option<HashSet<String>>,
    /// Its GuardrailPolicies as each route applies them (by the route's `namespace/name`, after
    /// the route's own), or why members cannot call (a policy missing or invalid: fail closed).
    pub guards: Result<HashMap<String, Arc<crate::guardrails::Guard>>, String>,
}

impl TeamEntry {
    /// Whether it names GuardrailPolicies (a broken one included).
    pub fn guarded(&self) -> bool {
        !matches!(&self.guards, Ok(g) if g.is_empty())
    }
}

/// Every Team, indexed by member.
#[derive(Debug, Default)]
pub struct Teams {
    list: Vec<Arc<TeamEntry>>,
    /// `sa:ns/name`, `ns:ns`, `key:ns/name` -> indexes into `list`.
    by_member: HashMap<String, Vec<usize>>,
    /// Some Team names GuardrailPolicies: only then does a call look up its caller's teams
    /// before admission.
    pub guarded: bool,
}

impl Teams {
    pub fn new(teams: impl IntoIterator<Item = (TeamEntry, Vec<AccessRule>)>) -> Teams {
        let mut out = Teams::default();
        for (i, (entry, members)) in teams.into_iter().enumerate() {
            for m in &members {
                let keys = [
                    m.service_account.as_ref().map(|s| format!("sa:{s}")),
                    m.namespace.as_ref().map(|n| format!("ns:{n}")),
                    m.consumer.as_ref().map(|c| format!("key:{c}")),
                ];
                for key in keys.into_iter().flatten() {
                    let slot = out.by_member.entry(key).or_default();
                    if !slot.contains(&i) {
                        slot.push(i);
                    }
                }
            }
            out.guarded |= entry.guarded();
            out.list.push(Arc::new(entry));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn all(&self) -> &[Arc<TeamEntry>] {
        &self.list
    }

    /// The Team called `name`, if there is one.
    pub fn named(&self, name: &str) -> Option<Arc<TeamEntry>> {
        self.list.iter().find(|t| t.name == name).cloned()
    }

    /// The teams `caller` belongs to, each once, in a stable order.
    pub fn of(&self, caller: &Identity) -> Vec<Arc<TeamEntry>> {
        if self.list.is_empty() {
            return Vec::new();
        }
        // A `namespace:` member rule covers every consumer of the namespace, API keys too:
        // a Team's budget must not be dodged by calling with a key instead of a token.
        let (kind, namespace, name) = match caller {
            Identity::ServiceAccount { namespace, name } => ("sa", namespace, name),
            Identity::Consumer { namespace, name } => ("key", namespace, name),
        };
        let mut found: Vec<usize> = [
            self.by_member.get(&format!("{kind}:{namespace}/{name}")),
            self.by_member.get(&format!("ns:{namespace}")),
        ]
        .into_iter()
        .flatten()
        .flatten()
        .copied()
        .collect();
        found.sort_unstable();
        found.dedup();
        found
            .into_iter()
            .filter_map(|i| self.list.get(i).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(sa: Option<&str>, ns: Option<&str>, key: Option<&str>) -> AccessRule {
        AccessRule {
            service_account: sa.map(String::from),
            namespace: ns.map(String::from),
            consumer: key.map(String::from),
        }
    }

    fn team(name: &str) -> TeamEntry {
        TeamEntry {
            name: name.into(),
            limits: vec![],
            counter_keys: crate::limits::team_keys(name),
            routes: None,
            guards: Ok(HashMap::new()),
        }
    }

    #[test]
    fn callers_find_each_of_their_teams_once() {
        let teams = Teams::new([
            (
                team("a"),
                vec![
                    rule(Some("ml/bot"), None, None),
                    rule(None, Some("ml"), None),
                ],
            ),
            (team("b"), vec![rule(None, Some("ml"), None)]),
            (team("c"), vec![rule(None, None, Some("ml/key"))]),
        ]);
        let sa = Identity::ServiceAccount {
            namespace: "ml".into(),
            name: "bot".into(),
        };
        let names = |v: Vec<Arc<TeamEntry>>| v.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(teams.of(&sa)), ["a", "b"]);
        let key = Identity::Consumer {
            namespace: "ml".into(),
            name: "key".into(),
        };
        // A namespace member rule covers every consumer of the namespace, API keys too.
        assert_eq!(names(teams.of(&key)), ["a", "b", "c"]);
        assert_eq!(teams.named("b").map(|t| t.name.clone()), Some("b".into()));
        assert!(teams.named("nope").is_none());
        let other = Identity::ServiceAccount {
            namespace: "web".into(),
            name: "bot".into(),
        };
        assert!(teams.of(&other).is_empty());
    }
}
