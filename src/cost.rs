//! What a call costs in USD: the price catalog, per-Route and per-backend overrides, and exact
//! integer arithmetic.
//!
//! Amounts are whole picodollars (10^-12 USD) in a `u64`: a price of `x` USD per million tokens is
//! `x * 10^6` picodollars per token, so the cost of a call is an integer product, exact for every
//! price with up to 6 decimal places per million tokens. Sums saturate (at about $18 million)
//! instead of wrapping. Prices are resolved once per backend when the routing table is built.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use serde::Deserialize;
use tracing::warn;

use crate::api::{Pricing, Provider, RouteType};
use crate::llm::{MAX_REPORTED_TOKENS, Usage};

/// Picodollars in one USD.
pub const PICOS_PER_USD: u64 = 1_000_000_000_000;

/// An amount of USD in picodollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(pub u64);

impl Usd {
    pub const ZERO: Usd = Usd(0);

    /// From a decimal number of dollars as configured (a CRD or catalog figure), rounded to the
    /// microdollar first so decimal inputs such as 0.01 are exact; `None` when not a finite
    /// non-negative amount below $10^9.
    pub fn from_dollars(dollars: f64) -> Option<Usd> {
        if !dollars.is_finite() || !(0.0..1e9).contains(&dollars) {
            return None;
        }
        let micros = (dollars * 1e6).round() as u64;
        Some(Usd(micros.saturating_mul(1_000_000)))
    }

    pub fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    /// The amount in USD as a float, for metrics exposition only (never for arithmetic).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / PICOS_PER_USD as f64
    }

    /// Dollars with at least `min_decimals` decimals and no trailing zeros beyond them.
    pub fn format(self, min_decimals: usize) -> String {
        let mut out = String::with_capacity(24);
        // Writing into a String cannot fail.
        let _ = self.write(&mut out, min_decimals);
        out
    }

    /// Writes the amount without an intermediate string (it is on every priced call's path).
    fn write(self, w: &mut impl std::fmt::Write, min_decimals: usize) -> std::fmt::Result {
        let mut frac = self.0 % PICOS_PER_USD;
        let mut digits = [b'0'; 12];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (frac % 10) as u8;
            frac /= 10;
        }
        let significant = digits.iter().rposition(|&d| d != b'0').map_or(0, |i| i + 1);
        let keep = significant.max(min_decimals.min(12));
        write!(w, "{}", self.0 / PICOS_PER_USD)?;
        if keep > 0 {
            w.write_char('.')?;
            w.write_str(std::str::from_utf8(&digits[..keep]).unwrap_or_default())?;
        }
        Ok(())
    }
}

impl std::fmt::Display for Usd {
    /// Exact: `0.0000375`, `1`, `12.5`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.write(f, 0)
    }
}

/// Prices of one model, in picodollars per token (= USD per million tokens × 10^6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

/// Token counts a call is charged for. `cached` is the part of `input` read from a prompt cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub cached: u64,
    pub output: u64,
}

impl Tokens {
    /// The tokens of a provider's usage report; `None` when it reports no count at all. A report
    /// with only a total (some embeddings APIs) is all input.
    pub fn from_usage(usage: &Usage) -> Option<Tokens> {
        let clamp = |n: u64| n.min(MAX_REPORTED_TOKENS);
        match (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
        ) {
            (None, None, None) => None,
            (None, None, Some(total)) => Some(Tokens {
                input: clamp(total),
                ..Tokens::default()
            }),
            (p, c, _) => {
                let input = clamp(p.unwrap_or(0));
                Some(Tokens {
                    input,
                    cached: clamp(usage.cached_prompt_tokens.unwrap_or(0)).min(input),
                    output: clamp(c.unwrap_or(0)),
                })
            }
        }
    }
}

impl Price {
    /// The exact cost of `tokens`, saturating.
    pub fn cost(&self, tokens: Tokens) -> Usd {
        let cached = tokens.cached.min(tokens.input);
        let sum = (u128::from(tokens.input - cached) * u128::from(self.input))
            .saturating_add(u128::from(cached) * u128::from(self.cached_input))
            .saturating_add(u128::from(tokens.output) * u128::from(self.output));
        Usd(u64::try_from(sum).unwrap_or(u64::MAX))
    }

    /// The most a call of `input` prompt and `output` completion tokens can cost at these prices.
    pub fn max_cost(&self, input: u64, output: u64) -> Usd {
        self.cost(Tokens {
            input,
            cached: 0,
            output,
        })
    }

    /// The higher of each of two prices: what a reservation charges when the backend is not yet chosen.
    pub fn max(self, other: Price) -> Price {
        Price {
            input: self.input.max(other.input),
            output: self.output.max(other.output),
            cached_input: self.cached_input.max(other.cached_input),
        }
    }
}

/// One catalog or override figure in USD per million tokens, as picodollars per token.
fn per_token(per_million: f64) -> Option<u64> {
    // Per-million prices above $10^6 are no real price: refused rather than trusted.
    (per_million <= 1e6)
        .then(|| Usd::from_dollars(per_million))
        .flatten()
        .map(|u| u.0 / 1_000_000)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CatalogProvider {
    /// Where the figures come from (a public page, a contract): required in the built-in file
    /// (a unit test checks it); documentation only.
    #[serde(default)]
    #[allow(dead_code)]
    source: Option<String>,
    /// When they were published or agreed.
    #[serde(default)]
    #[allow(dead_code)]
    as_of: Option<String>,
    models: BTreeMap<String, CatalogPrice>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CatalogPrice {
    input: f64,
    #[serde(default)]
    output: Option<f64>,
    #[serde(default)]
    cached_input: Option<f64>,
    /// The most output tokens the model writes in one answer (what a call without `max_tokens`
    /// reserves against a budget).
    #[serde(default)]
    max_output: Option<u64>,
}

/// One model of the catalog.
#[derive(Clone, Copy, Debug)]
struct Model {
    price: Price,
    max_output: Option<u64>,
}

/// The built-in prices, by provider and model.
#[derive(Debug, Default)]
pub struct Catalog {
    models: HashMap<Provider, BTreeMap<String, Model>>,
}

/// Output tokens reserved for a call without `max_tokens` whose model lists no `maxOutput`: the
/// largest figure of the catalog's current chat models is 128k (o-series 100k, Claude 64k); a
/// model that may write more needs its own `maxOutput` (catalog or the pricing ConfigMap).
pub const DEFAULT_MAX_OUTPUT: u64 = 32_768;

/// The most output tokens `model` may write, from the cluster-wide prices, else the catalog,
/// else `DEFAULT_MAX_OUTPUT`.
pub fn max_output(prices: Prices<'_>, provider: Provider, model: &str) -> u64 {
    prices
        .cluster
        .and_then(|c| c.model(provider, model))
        .and_then(|m| m.max_output)
        .or_else(|| {
            prices
                .catalog
                .model(provider, model)
                .and_then(|m| m.max_output)
        })
        .unwrap_or(DEFAULT_MAX_OUTPUT)
}

const CATALOG_YAML: &str = include_str!("../pricing/catalog.yaml");

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| {
    Catalog::parse(CATALOG_YAML).unwrap_or_else(|e| {
        // Unreachable in a build that passed its tests (a unit test parses the file).
        warn!(error = %e, "the built-in price catalog does not parse; every cost is unknown");
        Catalog::default()
    })
});

/// The prices a routing table is built with: the built-in catalog, under the cluster-wide
/// overrides of the `portcullis-pricing` ConfigMap when there is one (held by the controller and
/// passed to reconcile, which reads no global).
#[derive(Clone, Copy)]
pub struct Prices<'a> {
    pub catalog: &'a Catalog,
    pub cluster: Option<&'a Catalog>,
}

impl Prices<'static> {
    /// The built-in catalog alone.
    pub fn builtin() -> Prices<'static> {
        Prices {
            catalog: Catalog::builtin(),
            cluster: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("price catalog: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("price catalog: unknown provider {0:?}")]
    UnknownProvider(String),
    #[error("price catalog: {provider}/{model}: prices are USD per million tokens, 0 to 1000000")]
    BadPrice { provider: String, model: String },
}

impl Catalog {
    /// The catalog built into the binary, parsed on first use (the server forces it at start-up).
    pub fn builtin() -> &'static Catalog {
        &CATALOG
    }

    pub fn parse(yaml: &str) -> Result<Catalog, CatalogError> {
        let raw: BTreeMap<String, CatalogProvider> = serde_yaml::from_str(yaml)?;
        let mut models: HashMap<Provider, BTreeMap<String, Model>> = HashMap::new();
        for (name, p) in raw {
            let provider = Provider::ALL
                .into_iter()
                .find(|x| x.as_str() == name)
                .ok_or_else(|| CatalogError::UnknownProvider(name.clone()))?;
            for (model, price) in p.models {
                let bad = || CatalogError::BadPrice {
                    provider: name.clone(),
                    model: model.clone(),
                };
                let input = per_token(price.input).ok_or_else(bad)?;
                let output = price.output.map_or(Some(0), per_token).ok_or_else(bad)?;
                let cached_input = price
                    .cached_input
                    .map_or(Some(input), per_token)
                    .ok_or_else(bad)?;
                if price.max_output == Some(0) {
                    return Err(bad());
                }
                models.entry(provider).or_default().insert(
                    model,
                    Model {
                        price: Price {
                            input,
                            output,
                            cached_input,
                        },
                        max_output: price.max_output,
                    },
                );
            }
        }
        Ok(Catalog { models })
    }

    pub fn len(&self) -> usize {
        self.models.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The price of `model` at `provider`: listed exactly, or a dated snapshot of a listed name.
    pub fn get(&self, provider: Provider, model: &str) -> Option<Price> {
        self.model(provider, model).map(|m| m.price)
    }

    fn model(&self, provider: Provider, model: &str) -> Option<Model> {
        let models = self.models.get(&provider)?;
        if let Some(p) = models.get(model) {
            return Some(*p);
        }
        // The longest listed name the model extends with a snapshot suffix.
        models
            .iter()
            .filter(|(name, _)| {
                model
                    .strip_prefix(name.as_str())
                    .is_some_and(snapshot_suffix)
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
    }
}

/// The price a call counts against Team budgets: field by field never below the cluster-wide
/// price (`base`: the ConfigMap's, else the catalog's), whatever the Route's own `pricing` says.
/// A Route may price its calls as it likes for its own budgets, but a Team's budget is the
/// platform's: a member who owns a Route cannot make their calls free for it. Without a
/// cluster-wide price (a self-hosted model) the Route's price stands.
pub fn team_price(route: Option<Price>, base: Option<Price>) -> Option<Price> {
    match (route, base) {
        (Some(r), Some(b)) => Some(r.max(b)),
        (r, b) => r.or(b),
    }
}

/// `-2024-08-06`, `-20250514`, `-latest`: the same model, pinned or floating.
fn snapshot_suffix(rest: &str) -> bool {
    let Some(tail) = rest.strip_prefix('-') else {
        return false;
    };
    tail == "latest" || (!tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
}

/// The price a backend is charged at: its own `pricing`, over the Route's, over `cluster` (the
/// cluster-wide overrides), over the catalog, field by field. `None` (unknown) when no input
/// price, or no output price on a generating route, is found anywhere.
pub fn resolve(
    catalog: &Catalog,
    cluster: Option<&Price>,
    provider: Provider,
    model: &str,
    route_type: RouteType,
    overrides: &[Option<&Pricing>],
) -> Option<Price> {
    let base = cluster.copied().or_else(|| catalog.get(provider, model));
    let pick = |f: fn(&Pricing) -> Option<f64>| {
        overrides
            .iter()
            .flatten()
            .find_map(|p| f(p))
            .and_then(per_token)
    };
    let input = pick(|p| p.input_per_million).or(base.map(|b| b.input))?;
    let output = match pick(|p| p.output_per_million).or(base.map(|b| b.output)) {
        Some(o) => o,
        None if route_type == RouteType::Embeddings => 0,
        None => return None,
    };
    // An overridden input price without a cached one applies to cached tokens too.
    let input_overridden = pick(|p| p.input_per_million).is_some();
    let cached_input = pick(|p| p.cached_input_per_million)
        .or(base.filter(|_| !input_overridden).map(|b| b.cached_input))
        .unwrap_or(input);
    Some(Price {
        input,
        output,
        cached_input,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalog_parses_and_prices_known_models() {
        let c = Catalog::parse(CATALOG_YAML).unwrap();
        assert!(c.len() > 50, "{}", c.len());
        let p = c.get(Provider::Openai, "gpt-4o-mini").unwrap();
        // $0.15 / $0.60 / $0.075 per million tokens.
        assert_eq!(
            (p.input, p.output, p.cached_input),
            (150_000, 600_000, 75_000)
        );
        // Embeddings are priced on input; a snapshot is priced as its model.
        let e = c.get(Provider::Openai, "text-embedding-3-small").unwrap();
        assert_eq!((e.input, e.output), (20_000, 0));
        assert_eq!(
            c.get(Provider::Anthropic, "claude-sonnet-4-20250514"),
            c.get(Provider::Anthropic, "claude-sonnet-4")
        );
        assert_eq!(
            c.get(Provider::Openai, "gpt-4o-2024-08-06"),
            c.get(Provider::Openai, "gpt-4o")
        );
        // A longer name is its own model, never its prefix's.
        assert_ne!(
            c.get(Provider::Openai, "gpt-4o-mini-2024-07-18"),
            c.get(Provider::Openai, "gpt-4o")
        );
        assert_eq!(c.get(Provider::Openai, "gpt-4o-audio"), None);
        assert_eq!(c.get(Provider::Openai, "no-such-model"), None);
        assert_eq!(c.get(Provider::Anthropic, "gpt-4o"), None);
        // Sub-cent-per-million prices stay exact: $0.0375 per million.
        assert_eq!(
            c.get(Provider::Cohere, "command-r7b-12-2024")
                .unwrap()
                .input,
            37_500
        );
    }

    #[test]
    fn team_prices_never_go_below_the_cluster_wide_price() {
        let catalog = Price {
            input: 150_000,
            output: 600_000,
            cached_input: 75_000,
        };
        // A Route priced at 0 still costs its Team the catalog price; a dearer one costs more.
        assert_eq!(
            team_price(Some(Price::default()), Some(catalog)),
            Some(catalog)
        );
        let dear = Price {
            input: 1,
            output: 9_000_000,
            cached_input: 0,
        };
        assert_eq!(
            team_price(Some(dear), Some(catalog)),
            Some(Price {
                input: 150_000,
                output: 9_000_000,
                cached_input: 75_000
            })
        );
        assert_eq!(team_price(Some(dear), None), Some(dear));
        assert_eq!(team_price(None, None), None);
        // The catalog says how much a model may write; an unlisted model gets the default.
        let none = Prices::builtin();
        assert_eq!(max_output(none, Provider::Openai, "gpt-4o-mini"), 16_384);
        assert_eq!(
            max_output(none, Provider::Anthropic, "claude-sonnet-4-20250514"),
            64_000
        );
        assert_eq!(
            max_output(none, Provider::Ollama, "llama3"),
            DEFAULT_MAX_OUTPUT
        );
        let cluster =
            Catalog::parse("ollama: {models: {llama3: {input: 0, output: 0, maxOutput: 2048}}}")
                .unwrap();
        let with_cluster = Prices {
            cluster: Some(&cluster),
            ..Prices::builtin()
        };
        assert_eq!(max_output(with_cluster, Provider::Ollama, "llama3"), 2048);
        assert!(Catalog::parse("ollama: {models: {m: {input: 0, maxOutput: 0}}}").is_err());
    }

    #[test]
    fn every_builtin_provider_names_its_source_and_date() {
        let raw: BTreeMap<String, CatalogProvider> = serde_yaml::from_str(CATALOG_YAML).unwrap();
        for (provider, p) in raw {
            assert!(
                p.source.is_some_and(|s| s.starts_with("https://")),
                "{provider}"
            );
            assert!(p.as_of.is_some_and(|d| d.len() == 10), "{provider}");
        }
    }

    #[test]
    fn bad_catalogs_are_refused() {
        assert!(Catalog::parse("nope: {source: x, asOf: y, models: {}}").is_err());
        assert!(Catalog::parse("openai: {source: x, asOf: y, models: {m: {input: -1}}}").is_err());
        assert!(Catalog::parse("openai: {models: {m: {input: 1, extra: 2}}}").is_err());
    }

    #[test]
    fn costs_are_exact_to_the_picodollar() {
        let p = Price {
            input: per_token(2.5).unwrap(),
            output: per_token(10.0).unwrap(),
            cached_input: per_token(1.25).unwrap(),
        };
        // 1000 in (200 cached) + 500 out at gpt-4o prices: 800×2.5 + 200×1.25 + 500×10 = 7250 µ$.
        let c = p.cost(Tokens {
            input: 1000,
            cached: 200,
            output: 500,
        });
        assert_eq!(c, Usd(7_250_000_000));
        assert_eq!(c.to_string(), "0.00725");
        // The same from a provider's usage report naming its cached tokens.
        let reported = Usage::new(Some(1000), Some(500)).with_cached(Some(200));
        assert_eq!(p.cost(Tokens::from_usage(&reported).unwrap()), c);
        // More cached tokens than prompt tokens is nonsense: never a refund.
        let absurd = Usage::new(Some(10), Some(0)).with_cached(Some(50));
        assert_eq!(Tokens::from_usage(&absurd).unwrap().cached, 10);
        // A hundred cent-calls are exactly a dollar: no float drift.
        let cent = Price {
            input: 0,
            output: per_token(1000.0).unwrap(),
            cached_input: 0,
        }
        .cost(Tokens {
            input: 7,
            cached: 0,
            output: 10,
        });
        assert_eq!(cent.format(2), "0.01");
        let total = (0..100).fold(Usd::ZERO, |a, _| a.saturating_add(cent));
        assert_eq!(total, Usd(PICOS_PER_USD));
        assert_eq!(total.format(2), "1.00");
        // 0.1 + 0.2 is 0.3 here.
        let (a, b) = (
            Usd::from_dollars(0.1).unwrap(),
            Usd::from_dollars(0.2).unwrap(),
        );
        assert_eq!(a.saturating_add(b), Usd::from_dollars(0.3).unwrap());
    }

    #[test]
    fn absurd_figures_saturate() {
        let p = Price {
            input: u64::MAX,
            output: u64::MAX,
            cached_input: u64::MAX,
        };
        let t = Tokens {
            input: u64::MAX,
            cached: u64::MAX,
            output: u64::MAX,
        };
        assert_eq!(p.cost(t), Usd(u64::MAX));
        assert_eq!(Usd(u64::MAX).saturating_add(Usd(1)), Usd(u64::MAX));
        // Cached tokens above the input are capped at it (no underflow).
        let q = Price {
            input: 10,
            output: 0,
            cached_input: 1,
        };
        let t = Tokens {
            input: 5,
            cached: 9,
            output: 0,
        };
        assert_eq!(q.cost(t), Usd(5));
        for bad in [f64::NAN, f64::INFINITY, -0.5, 2e6] {
            assert_eq!(per_token(bad), None, "{bad}");
        }
        let u = Usage::new(Some(u64::MAX), Some(u64::MAX));
        let t = Tokens::from_usage(&u).unwrap();
        assert_eq!(t.input, MAX_REPORTED_TOKENS);
    }

    #[test]
    fn usage_reports_become_tokens() {
        assert_eq!(Tokens::from_usage(&Usage::default()), None);
        let total_only = Usage {
            total_tokens: Some(9),
            ..Usage::default()
        };
        assert_eq!(Tokens::from_usage(&total_only).unwrap().input, 9);
        let t = Tokens::from_usage(&Usage::new(Some(3), Some(4))).unwrap();
        assert_eq!((t.input, t.output), (3, 4));
    }

    #[test]
    fn formatting() {
        assert_eq!(Usd(0).to_string(), "0");
        assert_eq!(Usd(0).format(2), "0.00");
        assert_eq!(Usd(1).to_string(), "0.000000000001");
        assert_eq!(Usd(PICOS_PER_USD * 500).format(2), "500.00");
        assert_eq!(Usd(37_500_000).to_string(), "0.0000375");
        assert_eq!(Usd::from_dollars(0.01), Some(Usd(10_000_000_000)));
        assert_eq!(Usd::from_dollars(-1.0), None);
    }

    #[test]
    fn overrides_win_field_by_field() {
        let c = Catalog::parse(CATALOG_YAML).unwrap();
        let chat = RouteType::Chat;
        let over = |i: Option<f64>, o: Option<f64>, ci: Option<f64>| Pricing {
            input_per_million: i,
            output_per_million: o,
            cached_input_per_million: ci,
        };
        let catalog = resolve(&c, None, Provider::Openai, "gpt-4o", chat, &[]).unwrap();
        assert_eq!(catalog.output, 10_000_000);
        // The backend's own figure beats the Route's, which beats the catalog.
        let route = over(Some(1.0), Some(2.0), None);
        let backend = over(None, Some(3.0), None);
        let p = resolve(
            &c,
            None,
            Provider::Openai,
            "gpt-4o",
            chat,
            &[Some(&backend), Some(&route)],
        )
        .unwrap();
        assert_eq!(
            (p.input, p.output, p.cached_input),
            (1_000_000, 3_000_000, 1_000_000)
        );
        // The cluster-wide price replaces the catalog's.
        let cluster = Price {
            input: 7,
            output: 8,
            cached_input: 6,
        };
        let p = resolve(&c, Some(&cluster), Provider::Openai, "gpt-4o", chat, &[]).unwrap();
        assert_eq!(p, cluster);
        // Unknown stays unknown unless an override gives what the route type needs.
        assert_eq!(
            resolve(&c, None, Provider::Ollama, "llama3", chat, &[]),
            None
        );
        let input_only = over(Some(0.5), None, None);
        assert_eq!(
            resolve(
                &c,
                None,
                Provider::Ollama,
                "llama3",
                chat,
                &[Some(&input_only)]
            ),
            None
        );
        let e = resolve(
            &c,
            None,
            Provider::Ollama,
            "nomic",
            RouteType::Embeddings,
            &[Some(&input_only)],
        )
        .unwrap();
        assert_eq!((e.input, e.output), (500_000, 0));
    }
}
