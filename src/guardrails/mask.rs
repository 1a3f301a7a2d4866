//! Acting on the hits in one stretch of text: the first `block` wins, `mask` replaces the span by
//! its check's placeholder, `audit` is only noted.

use super::Guard;
use super::compile::Hit;
use crate::api::GuardrailAction;

/// A check that matched: its policy and its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub policy: usize,
    pub check: usize,
}

/// Hits of a guard's policies: the policy's index and its hit.
pub type Hits = Vec<(usize, Hit)>;

/// Writes `text[from..to]` to `out` with the valid hits inside it masked, noting each match in
/// `findings`; the first blocking match ends it.
pub fn apply(
    guard: &Guard,
    hits: &mut Hits,
    text: &str,
    from: usize,
    to: usize,
    out: &mut String,
    findings: &mut Vec<Finding>,
) -> Result<(), Finding> {
    hits.retain(|(_, h)| h.valid && h.start >= from && h.end <= to && h.end > h.start);
    // Earliest first; of two at one place the longer.
    hits.sort_by(|(_, a), (_, b)| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
    let mut at = from;
    for (policy, hit) in hits.iter() {
        let check = &guard.policies[*policy].checks[hit.check];
        let finding = Finding {
            policy: *policy,
            check: hit.check,
        };
        if !findings.contains(&finding) {
            findings.push(finding);
        }
        match check.action {
            GuardrailAction::Block => return Err(finding),
            GuardrailAction::Audit => {}
            // Overlapping a span masked already: the placeholder covers both.
            GuardrailAction::Mask if hit.start < at => at = at.max(hit.end),
            GuardrailAction::Mask => {
                out.push_str(&text[at..hit.start]);
                out.push_str(&check.placeholder);
                at = hit.end;
            }
        }
    }
    out.push_str(&text[at.min(to)..to]);
    Ok(())
}
