// The printcolumn(..) lists of the kube derive repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Secret key read when `secretRef.key` is not given.
pub const DEFAULT_SECRET_KEY: &str = "apiKey";

/// A named gateway route: one task type served by one or more provider models (backends), with
/// their credentials, a traffic policy and guardrails.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "Route",
    plural = "routes",
    namespaced,
    status = "RouteStatus",
    category = "portcullis",
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.routeType",
        description = "Task type served"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".status.provider",
        description = "LLM provider (each distinct one, for several backends)"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".status.model",
        description = "Provider model (the primary backend's and how many others)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the route serves requests"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.model) != has(self.backends)").message("set exactly one of model and backends"))]
pub struct RouteSpec {
    /// The task this route serves: llm/v1/completions, llm/v1/chat or llm/v1/embeddings.
    pub route_type: RouteType,
    /// The one provider model behind the route and how to reach it. Set this or `backends`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// Several provider models behind the route: calls are split by weight among the backends of
    /// the lowest priority that has a healthy one, and fall back to the next priority. Set this or `model`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.exists(b, !has(b.weight) || b.weight > 0)").message("at least one backend needs a weight above 0"))]
    pub backends: Vec<BackendSpec>,
    /// How a failed call is retried on another backend. Default: all four failure classes, and
    /// 1 + the number of fallback priorities in use as the total number of tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Passive health checking: a backend that keeps failing is ejected (skipped) for a while.
    /// On by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Embeddings routes only: allow backends that name different models. Vectors of different
    /// models are not comparable, so a route mixing them is refused unless this is true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_mixed_models: bool,
    /// Optional guardrails, each checked independently: calls and/or tokens per renewal period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub limits: Vec<Limit>,
    /// Who may call this route. Absent: the gateway-wide default access policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub access: Option<Vec<AccessRule>>,
    /// Prices of this route's calls, over the built-in catalog (a backend's own `pricing` wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// Answer repeated identical calls from the response cache (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// GuardrailPolicies (same namespace) whose checks every call of this route passes, in
    /// order. A missing or invalid one keeps the route from serving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub guardrails: Vec<String>,
}

/// The response cache of a Route: identical calls (same messages, tools and sampling parameters)
/// are answered from a stored answer without a provider call, free of tokens and USD.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// How long an answer is served after it was stored (default `1h`, at most `720h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]{1,6}(ms|s|m|h))+$"))]
    pub ttl: Option<String>,
    /// Who may be served an entry: `consumer` (default) only the caller that stored it, `team`
    /// the members of the caller's Teams, `route` every caller of the Route.
    #[serde(default)]
    pub scope: CacheScope,
    /// Largest answer stored, in bytes before compression (default 1048576 = 1 MiB, at most 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 67108864))]
    pub max_entry_bytes: Option<u64>,
    /// Also answer a chat call whose prompt is close in meaning to a stored one (off when absent):
    /// on an exact miss the prompt is embedded through an embeddings Route and the nearest stored
    /// prompt of the same scope answers when similar enough. Never for calls with tools or images,
    /// nor with a temperature above 0.5. The index is per replica, in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<SemanticSpec>,
}

/// Semantic matching: the embeddings Route that embeds prompts, and how close is close enough.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SemanticSpec {
    /// An `llm/v1/embeddings` Route of the same namespace. Its limits and cost apply to the
    /// embeddings, counted under the consumer `cache/<namespace>/<this route>`. While it is
    /// missing or not an embeddings Route, the cache matches identical calls only (Ready reason
    /// `SemanticMatchingOff`).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub embeddings_route: String,
    /// Least cosine similarity of two prompts' embeddings for one to answer the other, above 0
    /// and at most 1 (default 0.95).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1.0))]
    #[x_kube(validation = Rule::new("self > 0.0").message("threshold must be above 0"))]
    pub threshold: Option<f64>,
    /// Most prompts this replica remembers for the Route, oldest out first (default 1000, at
    /// most 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_entries: Option<u32>,
}

/// Whose calls share cache entries.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Each caller separately (anonymous callers share one scope).
    #[default]
    Consumer,
    /// The members of the caller's Teams; a caller in no Team is its own scope.
    Team,
    /// Every caller of the Route.
    Route,
}

/// USD per million tokens; each figure given replaces the catalog's (0 to 1000000, at most 6
/// decimals). Cached input defaults to the input price when the input price is overridden.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// Prompt tokens (and embeddings inputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub input_per_million: Option<f64>,
    /// Completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub output_per_million: Option<f64>,
    /// Prompt tokens the provider reports as read from its prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub cached_input_per_million: Option<f64>,
}

/// Task types, named as in MLflow's AI Gateway.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteType {
    #[serde(rename = "llm/v1/completions")]
    Completions,
    #[serde(rename = "llm/v1/chat")]
    Chat,
    #[serde(rename = "llm/v1/embeddings")]
    Embeddings,
}

impl RouteType {
    /// The OpenTelemetry GenAI operation name (`gen_ai.operation.name`) of calls of this type.
    pub fn operation(self) -> &'static str {
        match self {
            RouteType::Chat => "chat",
            RouteType::Completions => "text_completion",
            RouteType::Embeddings => "embeddings",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteType::Completions => "llm/v1/completions",
            RouteType::Chat => "llm/v1/chat",
            RouteType::Embeddings => "llm/v1/embeddings",
        }
    }
}

impl std::fmt::Display for RouteType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const ONE_DESTINATION: &str = "set at most one of apiBase, inferencePool and service";
const SATURATION_NEEDS_POOL: &str = "saturation applies to inferencePool and service backends";

/// The provider model a route forwards to: a provider's API (`apiBase`, or the provider's
/// default), or model servers in the cluster (`inferencePool` or `service`).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.apiBase), has(self.inferencePool), has(self.service)].filter(x, x).size() <= 1").message(ONE_DESTINATION))]
#[x_kube(validation = Rule::new("!has(self.saturation) || has(self.inferencePool) || has(self.service)").message(SATURATION_NEEDS_POOL))]
pub struct ModelSpec {
    /// The LLM provider that serves the model.
    pub provider: Provider,
    /// The provider's model (or deployment) name, sent upstream. Letters, digits and `._:/@+-`.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    )]
    pub name: String,
    /// Overrides the provider's default base URL (for example a proxy or a self-hosted server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s/?#]+[^\s?#]*$"))]
    pub api_base: Option<String>,
    /// The Secret in the Route's namespace that holds the provider credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Provider-specific, non-secret settings (for example region or api-version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Self-hosted model servers: the pods of this InferencePool (Gateway API Inference
    /// Extension, `inference.networking.k8s.io/v1`), each call sent to the one the gateway picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_pool: Option<PoolRef>,
    /// Self-hosted model servers behind a plain Service: its ready endpoints (EndpointSlices),
    /// each call sent to the one the gateway picks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Pool backends only: when every endpoint is above this load, the pool is skipped for the
    /// call and the Route's next priority takes it. Absent: the pool takes every call it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saturation: Option<Saturation>,
}

impl ModelSpec {
    /// Whether this backend is model servers in the cluster rather than a provider's URL.
    pub fn is_pool(&self) -> bool {
        self.inference_pool.is_some() || self.service.is_some()
    }
}

/// An InferencePool, in the Route's namespace unless `namespace` is given.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct PoolRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// A Service in the Route's namespace and the port its model servers listen on (the Service's
/// target port, as its EndpointSlices list it).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
}

/// When a pool counts as saturated.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Saturation {
    /// Requests waiting in an endpoint's queue (its model server's `num_requests_waiting`, plus
    /// the calls the gateway sent since it last read it) above which that endpoint is saturated.
    #[schemars(range(max = 100000))]
    pub queue_depth: u32,
}

/// One backend of a Route: a provider model (every field of `model`) with its share of the traffic.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    #[serde(flatten)]
    pub model: ModelSpec,
    /// Share of the calls among the backends of the same priority (default 1; 0 drains the backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub weight: Option<u32>,
    /// 0 (default) is tried first; a higher priority only when no backend of a lower one can take the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 15))]
    pub priority: Option<u32>,
    /// This backend's prices, over the Route's `pricing` and the built-in catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
}

impl BackendSpec {
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(1)
    }

    pub fn priority(&self) -> u32 {
        self.priority.unwrap_or(0)
    }
}

/// The failures after which a call is tried again on another backend.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The provider answered 429.
    RateLimited,
    /// The provider answered 5xx (or Anthropic's 529 overloaded).
    Unavailable,
    /// No answer within the per-try timeout.
    Timeout,
    /// The connection was refused or reset.
    ConnectFailure,
}

impl RetryOn {
    pub const ALL: [RetryOn; 4] = [
        RetryOn::RateLimited,
        RetryOn::Unavailable,
        RetryOn::Timeout,
        RetryOn::ConnectFailure,
    ];
}

const LEGACY_ON: &str = "retry.on is now retry.retryOn (YAML 1.1 readers such as kubectl turn a plain on: key into true)";
const LEGACY_TRUE: &str =
    "retry.true is an unquoted on: key read as YAML 1.1's boolean; write retry.retryOn";

/// How one call is retried across backends.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.on)").message(LEGACY_ON))]
#[x_kube(validation = Rule::new("!has(self.__true__)").message(LEGACY_TRUE))]
pub struct RetryPolicy {
    /// Total tries of one call across backends, the first included (default: 1 + the number of
    /// fallback priorities in use). Never more, whatever the number of backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: Option<u32>,
    /// Failure classes that are retried (default: all four). Other errors, such as a 400, go
    /// straight back to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4))]
    pub retry_on: Option<Vec<RetryOn>>,
    /// Time allowed for one try (for a stream: until its first chunk); the gateway-wide upstream
    /// timeout otherwise. A duration such as `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]{1,6}(ms|s|m|h))+$"))]
    pub per_try_timeout: Option<String>,
    /// The field's old name, refused: kept in the schema so that a Route still using it is
    /// rejected with a message naming `retryOn` instead of being pruned and silently ignored.
    #[serde(default, rename = "on", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "legacy_list")]
    pub legacy_on: Option<serde_json::Value>,
    /// `on:` as a YAML 1.1 reader (kubectl, Argo CD, Flux) stores it; refused like `on`.
    #[serde(default, rename = "true", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "legacy_list")]
    pub legacy_true: Option<serde_json::Value>,
}

impl RetryPolicy {
    /// Why the policy cannot be used as written, naming the field to write instead.
    pub fn legacy_field(&self) -> Option<&'static str> {
        if self.legacy_on.is_some() {
            Some(LEGACY_ON)
        } else if self.legacy_true.is_some() {
            Some(LEGACY_TRUE)
        } else {
            None
        }
    }
}

/// The old field's shape (a list of names): CEL rules can only test typed fields.
fn legacy_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 4,
        "items": {"type": "string", "maxLength": 32},
    })
}

/// Passive health checking of backends.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Failures in a row (429, 5xx, timeouts, connection failures) that eject a backend (default 5; 0 turns
    /// failure-based ejection off). A 429 with Retry-After ejects its backend for that long regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub consecutive_failures: Option<u32>,
    /// How long a first ejection lasts (default 30s); it doubles on each repeated ejection up to
    /// `maxEjectionTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]{1,6}(ms|s|m|h))+$"))]
    pub base_ejection_time: Option<String>,
    /// The longest ejection (default 300s), also the cap on a provider's Retry-After.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]{1,6}(ms|s|m|h))+$"))]
    pub max_ejection_time: Option<String>,
}

/// Parses a duration matching the CRD's pattern (`500ms`, `30s`, `1h30m`); `None` otherwise.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total_ms: u64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 6 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        rest = &rest[len..];
        total_ms = total_ms.checked_add(n.checked_mul(unit_ms)?)?;
    }
    Some(std::time::Duration::from_millis(total_ms))
}

impl RouteSpec {
    /// A route of one provider model, with no policy, limits or access rules.
    pub fn new(route_type: RouteType, model: ModelSpec) -> RouteSpec {
        RouteSpec {
            route_type,
            model: Some(model),
            backends: Vec::new(),
            retry: None,
            outlier_detection: None,
            allow_mixed_models: false,
            limits: Vec::new(),
            access: None,
            pricing: None,
            cache: None,
            guardrails: Vec::new(),
        }
    }

    /// What `kubectl get` shows as the route's provider and model: `openai`, `gpt-4o-mini` for
    /// one model; `openai,anthropic`, `gpt-4o-mini +2` for three backends.
    pub fn summary(&self) -> (String, String) {
        let mut providers: Vec<&str> = Vec::new();
        for m in self.models() {
            if !providers.contains(&m.provider.as_str()) {
                providers.push(m.provider.as_str());
            }
        }
        let model = self.primary_model().map_or("", |m| m.name.as_str());
        let model = match self.backends.len() {
            0 | 1 => model.to_string(),
            n => format!("{model} +{}", n - 1),
        };
        (providers.join(","), model)
    }

    /// Every provider model of the route: `model`, or each backend's.
    pub fn models(&self) -> impl Iterator<Item = &ModelSpec> {
        self.model
            .iter()
            .chain(self.backends.iter().map(|b| &b.model))
    }

    /// The backend a listing names as the route's model: `model`, else the priority-0 (lowest)
    /// backend with the highest weight (the first one listed on a tie).
    pub fn primary_model(&self) -> Option<&ModelSpec> {
        self.model.as_ref().or_else(|| {
            self.backends
                .iter()
                .enumerate()
                .min_by_key(|(i, b)| (b.priority(), std::cmp::Reverse(b.weight()), *i))
                .map(|(_, b)| &b.model)
        })
    }
}

/// A reference to a key in a Secret of the Route's own namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the Route's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret that holds the API key (default "apiKey").
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    DEFAULT_SECRET_KEY.to_string()
}

/// Supported providers: the set MLflow's gateway speaks plus the OpenAI-compatible family.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Openai,
    AzureOpenai,
    Anthropic,
    Cohere,
    Gemini,
    Bedrock,
    Mistral,
    HuggingfaceTgi,
    DatabricksModelServing,
    MlflowModelServing,
    Ai21,
    Together,
    Groq,
    Deepseek,
    Ollama,
    OpenaiCompatible,
}

impl Provider {
    pub const ALL: [Provider; 16] = [
        Provider::Openai,
        Provider::AzureOpenai,
        Provider::Anthropic,
        Provider::Cohere,
        Provider::Gemini,
        Provider::Bedrock,
        Provider::Mistral,
        Provider::HuggingfaceTgi,
        Provider::DatabricksModelServing,
        Provider::MlflowModelServing,
        Provider::Ai21,
        Provider::Together,
        Provider::Groq,
        Provider::Deepseek,
        Provider::Ollama,
        Provider::OpenaiCompatible,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::AzureOpenai => "azure-openai",
            Provider::Anthropic => "anthropic",
            Provider::Cohere => "cohere",
            Provider::Gemini => "gemini",
            Provider::Bedrock => "bedrock",
            Provider::Mistral => "mistral",
            Provider::HuggingfaceTgi => "huggingface-tgi",
            Provider::DatabricksModelServing => "databricks-model-serving",
            Provider::MlflowModelServing => "mlflow-model-serving",
            Provider::Ai21 => "ai21",
            Provider::Together => "together",
            Provider::Groq => "groq",
            Provider::Deepseek => "deepseek",
            Provider::Ollama => "ollama",
            Provider::OpenaiCompatible => "openai-compatible",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One guardrail: a number of calls and/or tokens allowed per renewal period.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.calls) || has(self.tokens) || has(self.usd)").message("a limit needs calls, tokens, usd or several of them"))]
#[x_kube(validation = Rule::new("!has(self.onExceed) || self.onExceed == 'reject' || has(self.usd)").message("onExceed: truncate applies to USD budgets (usd)"))]
pub struct Limit {
    /// The window after which the counts start again: second, minute, hour, day, week or month
    /// (fixed windows aligned in UTC: midnight, Monday 00:00, the 1st at 00:00).
    pub renewal_period: RenewalPeriod,
    /// Requests allowed per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub calls: Option<u64>,
    /// Prompt plus completion tokens allowed per period (a budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<u64>,
    /// USD allowed per period (a budget) at the prices of the route's backends, up to $1,000,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.000001, max = 1000000.0))]
    pub usd: Option<f64>,
    /// What is counted: the route as a whole, or each consumer separately.
    #[serde(default)]
    pub key: LimitKey,
    /// USD budgets only, for streams: `reject` (default) refuses a call before it starts when its
    /// reservation does not fit; `truncate` starts it with what is left and ends the stream
    /// cleanly where its running cost would pass that, charging what was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exceed: Option<OnExceed>,
    /// `reject` (default) refuses calls past the limit; `alert` never refuses: crossing 80% and
    /// 100% of it is told once per window (a Kubernetes Event on the Route or Team, the
    /// `portcullis_limit_alerts_total` metric and a log line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<LimitAction>,
}

/// What a limit does when reached.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum LimitAction {
    Reject,
    Alert,
}

/// What a USD budget does to a stream that would cross it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum OnExceed {
    Reject,
    Truncate,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RenewalPeriod {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitKey {
    /// All callers of the route together.
    #[default]
    Route,
    /// Each caller separately.
    Consumer,
}

/// One grant of access; exactly one field is set.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.serviceAccount), has(self.namespace), has(self.consumer)].filter(x, x).size() == 1").message("set exactly one of serviceAccount, namespace, consumer"))]
pub struct AccessRule {
    /// A Kubernetes ServiceAccount, as namespace/name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317), regex(pattern = r"^[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub service_account: Option<String>,
    /// Every ServiceAccount of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// An API-key consumer, as the namespace/name of its Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317), regex(pattern = r"^[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub consumer: Option<String>,
}

/// What the controller observed and decided about a Route.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The MLflow gateway invocation path of this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The provider, or the distinct providers of the backends (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The provider model, or the primary backend's with the number of others, such as
    /// `gpt-4o-mini +2` (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The limits the gateway enforces for this route (its accepted spec.limits; empty while the
    /// route does not serve). With a shared limits store they hold across all replicas together;
    /// otherwise each of N replicas enforces 1/N of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Each backend of a Route with `backends`, and whether it resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStatus>,
    /// Current state; Ready is the summary condition, Degraded names backends that do not resolve.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Whether one backend could be resolved (Secret found, key present, provider serves the route type).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub provider: Provider,
    pub model: String,
    pub resolved: bool,
    /// Pool backends: the pool (`inferencepool/NAMESPACE/NAME` or `service/NAMESPACE/NAME:PORT`)
    /// and how many of its endpoints are ready now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_endpoints: Option<u32>,
    /// An InferencePool's endpoint picker: `Reachable` or `Unreachable` as its last exchange
    /// went, `Unknown` before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_picker: Option<String>,
    /// Why not, when it did not resolve (a Ready reason such as SecretNotFound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
