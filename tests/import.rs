//! `portcullis import mlflow|litellm`: representative configs (every provider each converter
//! supports, environment-variable keys, limits, LiteLLM's load balancing and fallbacks) import to
//! manifests that the real kube-apiserver accepts (real kubectl) and that the gateway then serves.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::*;

/// Runs `portcullis import ...`: exit code, stdout, stderr.
fn import(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("import").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run portcullis import");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A call of the route's type through the OpenAI surface.
fn call(gw: &Gateway, route: &str, route_type: &str) -> (u16, Value) {
    match route_type {
        "completions" => gw.post(
            "/v1/completions",
            &json!({"model": route, "prompt": "hello", "max_tokens": 5}),
        ),
        "embeddings" => gw.post("/v1/embeddings", &json!({"model": route, "input": ["a"]})),
        _ => gw.chat(route),
    }
}

/// Applies `manifests`, serves them from a gateway watching `ns`, waits for `routes` to be Ready.
fn apply_and_serve(cp: &ControlPlane, ns: &str, manifests: &str, routes: &[&str]) -> Gateway {
    let out = cp.kubectl_stdin(&["apply", "-n", ns, "-f", "-"], manifests);
    assert!(
        out.status.success(),
        "kubectl apply refused the import: {}\n{manifests}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gw = Gateway::start(cp, &["--namespace", ns]);
    for r in routes {
        cp.wait_ready(ns, r);
    }
    gw
}

/// The simulated provider's address, as `host:port`.
fn sim_addr(sim: &SimProvider) -> String {
    sim.openai_base()
        .trim_start_matches("http://")
        .trim_end_matches("/openai/v1")
        .to_string()
}

#[test]
fn an_mlflow_config_with_every_provider_imports_applies_and_serves() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("import-mlflow");
    let sim = sim();
    let b = |p: &str| sim.base(p);
    let config = format!(
        r#"endpoints:
  - name: chat
    endpoint_type: llm/v1/chat
    model: {{provider: openai, name: gpt-4o-mini, config: {{openai_api_key: $T_OPENAI_KEY, openai_api_base: "{openai}"}}}}
    limit: {{renewal_period: minute, calls: 100}}
  - name: completions
    endpoint_type: llm/v1/completions
    model: {{provider: openai, name: gpt-3.5-turbo-instruct, config: {{openai_api_key: $T_OPENAI_KEY, openai_api_base: "{openai}"}}}}
  - name: embeddings
    endpoint_type: llm/v1/embeddings
    model: {{provider: openai, name: text-embedding-3-small, config: {{openai_api_key: $T_OPENAI_KEY, openai_api_base: "{openai}"}}}}
  - name: azure-chat
    endpoint_type: llm/v1/chat
    model:
      provider: azure
      name: gpt-4o
      config: {{openai_api_key: $T_AZURE_KEY, openai_api_base: "{azure}", openai_api_version: "2024-10-21", openai_deployment_name: my-deployment}}
  - name: claude
    endpoint_type: llm/v1/chat
    model: {{provider: anthropic, name: claude-3-5-haiku-latest, config: {{anthropic_api_key: $T_ANTHROPIC_KEY, anthropic_api_base: "{anthropic}"}}}}
  - name: tgi
    endpoint_type: llm/v1/completions
    model: {{provider: huggingface-text-generation-inference, name: tgi, config: {{hf_server_url: "{tgi}"}}}}
  - name: served-model
    endpoint_type: llm/v1/completions
    model: {{provider: mlflow-model-serving, name: generator, config: {{model_server_url: "{mlflow}"}}}}
  - name: dbrx
    endpoint_type: llm/v1/chat
    model: {{provider: databricks, name: databricks-dbrx-instruct, config: {{host: "{databricks}", token: $T_DATABRICKS_TOKEN}}}}
  - name: groq-chat
    endpoint_type: llm/v1/chat
    model: {{provider: groq, name: llama-3.1-8b-instant, config: {{api_key: $T_GROQ_KEY, api_base: "{groq}"}}}}
  - name: deepseek-chat
    endpoint_type: llm/v1/chat
    model: {{provider: deepseek, name: deepseek-chat, config: {{api_key: $T_DEEPSEEK_KEY, api_base: "{deepseek}"}}}}
  - name: ollama-chat
    endpoint_type: llm/v1/chat
    model: {{provider: ollama, name: llama3.2, config: {{api_base: "{ollama}"}}}}
  - name: Grok_Chat
    endpoint_type: llm/v1/chat
    model: {{provider: xai, name: grok-3-mini, config: {{api_key: $T_XAI_KEY, api_base: "{compatible}"}}}}
  - name: cohere-chat
    endpoint_type: llm/v1/chat
    model: {{provider: cohere, name: command-r, config: {{cohere_api_key: $T_COHERE_KEY}}}}
  - name: gemini-chat
    endpoint_type: llm/v1/chat
    model: {{provider: gemini, name: gemini-2.0-flash, config: {{gemini_api_key: $T_GEMINI_KEY}}}}
  - name: mistral-chat
    endpoint_type: llm/v1/chat
    model: {{provider: mistral, name: mistral-small-latest, config: {{mistral_api_key: $T_MISTRAL_KEY}}}}
  - name: together-chat
    endpoint_type: llm/v1/chat
    model: {{provider: togetherai, name: meta-llama/Llama-3-8b-chat-hf, config: {{togetherai_api_key: $T_TOGETHER_KEY}}}}
  - name: jamba
    endpoint_type: llm/v1/chat
    model: {{provider: ai21labs, name: jamba-mini, config: {{ai21labs_api_key: $T_AI21_KEY}}}}
  - name: nova
    endpoint_type: llm/v1/chat
    model:
      provider: amazon-bedrock
      name: amazon.nova-lite-v1:0
      config:
        aws_config: {{aws_region: us-west-2, aws_access_key_id: $T_AWS_ID, aws_secret_access_key: $T_AWS_SECRET}}
routes:
  - name: split
    task_type: llm/v1/chat
    destinations: [{{name: chat, traffic_percentage: 70}}, {{name: claude, traffic_percentage: 30}}]
    routing_strategy: TRAFFIC_SPLIT
"#,
        openai = sim.openai_base(),
        azure = b("azure-openai"),
        anthropic = b("anthropic"),
        tgi = b("huggingface-tgi"),
        mlflow = b("mlflow-model-serving"),
        databricks = b("databricks-model-serving"),
        groq = b("groq"),
        deepseek = b("deepseek"),
        ollama = b("ollama"),
        compatible = b("openai-compatible"),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, config).unwrap();
    let keys: Vec<(String, String)> = [
        "T_OPENAI_KEY",
        "T_AZURE_KEY",
        "T_ANTHROPIC_KEY",
        "T_DATABRICKS_TOKEN",
        "T_GROQ_KEY",
        "T_DEEPSEEK_KEY",
        "T_XAI_KEY",
        "T_COHERE_KEY",
        "T_GEMINI_KEY",
        "T_MISTRAL_KEY",
        "T_TOGETHER_KEY",
        "T_AI21_KEY",
        "T_AWS_ID",
        "T_AWS_SECRET",
    ]
    .iter()
    .map(|k| (k.to_string(), format!("value-of-{}", k.to_lowercase())))
    .collect();
    let env: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // Without --with-secrets: placeholders and the command that creates each Secret.
    let (code, placeholders, stderr) = import(&["mlflow", path_str(&file)], &env);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        placeholders.contains("REPLACE-with-the-value-of-$T_OPENAI_KEY"),
        "{placeholders}"
    );
    assert!(
        placeholders.contains(
            "kubectl create secret generic t-openai-key --from-literal=apiKey=\"$T_OPENAI_KEY\""
        ),
        "{placeholders}"
    );
    for (_, v) in &keys {
        assert!(
            !placeholders.contains(v.as_str()),
            "a key leaked without --with-secrets"
        );
    }
    assert!(
        stderr.contains("renamed: endpoints[11]: \"Grok_Chat\""),
        "{stderr}"
    );

    let (code, manifests, stderr) = import(&["mlflow", path_str(&file), "--with-secrets"], &env);
    assert_eq!(code, Some(0), "{stderr}");
    let served = [
        ("chat", "chat", "value-of-t_openai_key"),
        ("completions", "completions", "value-of-t_openai_key"),
        ("embeddings", "embeddings", "value-of-t_openai_key"),
        ("azure-chat", "chat", "value-of-t_azure_key"),
        ("claude", "chat", "value-of-t_anthropic_key"),
        ("tgi", "completions", ""),
        ("served-model", "completions", ""),
        ("dbrx", "chat", "value-of-t_databricks_token"),
        ("groq-chat", "chat", "value-of-t_groq_key"),
        ("deepseek-chat", "chat", "value-of-t_deepseek_key"),
        ("ollama-chat", "chat", ""),
        ("grok-chat", "chat", "value-of-t_xai_key"),
        ("split", "chat", ""),
    ];
    // These have no base URL in MLflow's config: they point at the real provider, so they are
    // only checked to resolve (Secret found, provider serves the type).
    let real = [
        "cohere-chat",
        "gemini-chat",
        "mistral-chat",
        "together-chat",
        "jamba",
        "nova",
    ];
    let names: Vec<&str> = served.iter().map(|s| s.0).chain(real).collect();
    let gw = apply_and_serve(cp, &ns, &manifests, &names);
    for (route, route_type, key) in served {
        sim.clear();
        let (status, body) = call(&gw, route, route_type);
        assert_eq!(status, 200, "{route}: {body}");
        let sent = sim.last_request().expect("the provider got the call");
        if !key.is_empty() {
            assert!(
                sent.headers.iter().any(|(_, v)| v.contains(key)),
                "{route}: the key from the environment was not sent: {:?}",
                sent.headers
            );
        }
    }
    let chat = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "chat"]);
    assert_eq!(
        chat["spec"]["limits"][0],
        json!({"renewalPeriod": "minute", "calls": 100, "key": "route"})
    );
    let split = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "split"]);
    let weights: Vec<(&str, &Value)> = split["spec"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["provider"].as_str().unwrap(), &b["weight"]))
        .collect();
    assert_eq!(weights, [("openai", &json!(70)), ("anthropic", &json!(30))]);
    let azure = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "azure-chat"]);
    assert_eq!(azure["spec"]["model"]["name"], "my-deployment");
    assert_eq!(azure["spec"]["model"]["config"]["apiVersion"], "2024-10-21");
}

#[test]
fn a_litellm_config_imports_to_routes_with_backends_fallbacks_and_every_provider() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("import-litellm");
    let sim = sim();
    sim.set_aws_secret("value-of-t_aws_secret");
    let b = |p: &str| sim.base(p);
    let addr = sim_addr(&sim);
    let config = format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params: {{model: azure/gpt-4o-eu, api_base: "{azure}", api_version: "2024-10-21", api_key: os.environ/T_AZURE_KEY, weight: 3, rpm: 600}}
  - model_name: gpt-4o
    litellm_params: {{model: openai/gpt-4o, api_base: "{openai}", api_key: os.environ/T_OPENAI_KEY, weight: 1, rpm: 300}}
  - model_name: claude
    litellm_params: {{model: anthropic/claude-3-5-haiku-latest, api_base: "{anthropic}", api_key: os.environ/T_ANTHROPIC_KEY}}
  - model_name: command-r
    litellm_params: {{model: cohere_chat/command-r, api_base: "{cohere}", api_key: os.environ/T_COHERE_KEY}}
  - model_name: gemini-flash
    litellm_params: {{model: gemini/gemini-2.0-flash, api_base: "{gemini}", api_key: os.environ/T_GEMINI_KEY}}
  - model_name: nova
    litellm_params: {{model: bedrock/converse/amazon.nova-lite-v1:0, api_base: "{bedrock}", aws_access_key_id: os.environ/T_AWS_ID, aws_secret_access_key: os.environ/T_AWS_SECRET, aws_region_name: us-west-2}}
  - model_name: mistral-small
    litellm_params: {{model: mistral/mistral-small-latest, api_base: "{mistral}", api_key: os.environ/T_MISTRAL_KEY}}
  - model_name: dbrx
    litellm_params: {{model: databricks/databricks-dbrx-instruct, api_base: "{databricks}", api_key: os.environ/T_DATABRICKS_TOKEN}}
  - model_name: jamba
    litellm_params: {{model: ai21_chat/jamba-mini, api_base: "{ai21}", api_key: os.environ/T_AI21_KEY}}
  - model_name: together-llama
    litellm_params: {{model: together_ai/meta-llama/Llama-3-8b-chat-hf, api_base: "{together}", api_key: os.environ/T_TOGETHER_KEY}}
  - model_name: groq-llama
    litellm_params: {{model: groq/llama-3.1-8b-instant, api_base: "{groq}", api_key: os.environ/T_GROQ_KEY}}
  - model_name: deepseek-chat
    litellm_params: {{model: deepseek/deepseek-chat, api_base: "{deepseek}", api_key: os.environ/T_DEEPSEEK_KEY}}
  - model_name: llama3-local
    litellm_params: {{model: ollama_chat/llama3.2, api_base: "http://{addr}/ollama"}}
  - model_name: tgi
    litellm_params: {{model: huggingface/tgi, api_base: "{tgi}"}}
    model_info: {{mode: completion}}
  - model_name: vllm
    litellm_params: {{model: hosted_vllm/qwen2.5, api_base: "{compatible}"}}
  - model_name: embed
    litellm_params: {{model: openai/text-embedding-3-small, api_base: "{openai}", api_key: os.environ/T_OPENAI_KEY}}
    model_info: {{mode: embedding, id: embed-1}}
router_settings:
  routing_strategy: simple-shuffle
  fallbacks: [{{gpt-4o: [claude]}}]
  num_retries: 2
litellm_settings:
  success_callback: [langfuse]
general_settings:
  master_key: sk-litellm-master
"#,
        azure = b("azure-openai"),
        openai = sim.openai_base(),
        anthropic = b("anthropic"),
        cohere = b("cohere"),
        gemini = b("gemini"),
        bedrock = b("bedrock"),
        mistral = b("mistral"),
        databricks = b("databricks-model-serving"),
        ai21 = b("ai21"),
        together = b("together"),
        groq = b("groq"),
        deepseek = b("deepseek"),
        tgi = b("huggingface-tgi"),
        compatible = b("openai-compatible"),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, config).unwrap();
    let keys: Vec<(String, String)> = [
        "T_OPENAI_KEY",
        "T_AZURE_KEY",
        "T_ANTHROPIC_KEY",
        "T_DATABRICKS_TOKEN",
        "T_GROQ_KEY",
        "T_DEEPSEEK_KEY",
        "T_COHERE_KEY",
        "T_GEMINI_KEY",
        "T_MISTRAL_KEY",
        "T_TOGETHER_KEY",
        "T_AI21_KEY",
        "T_AWS_ID",
        "T_AWS_SECRET",
    ]
    .iter()
    .map(|k| (k.to_string(), format!("value-of-{}", k.to_lowercase())))
    .collect();
    let env: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, manifests, stderr) = import(
        &[
            "litellm",
            path_str(&file),
            "--with-secrets",
            "--namespace",
            &ns,
        ],
        &env,
    );
    assert_eq!(code, Some(0), "{stderr}");
    // Every key that is not carried over is named on stderr; no value is.
    for needle in [
        "litellm_settings.success_callback: not supported",
        "general_settings: not supported",
        "model_list[15].model_info.id",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from:\n{stderr}");
    }
    assert!(!stderr.contains("sk-litellm-master"), "{stderr}");

    let served = [
        ("gpt-4o", "chat"),
        ("claude", "chat"),
        ("command-r", "chat"),
        ("gemini-flash", "chat"),
        ("nova", "chat"),
        ("mistral-small", "chat"),
        ("dbrx", "chat"),
        ("jamba", "chat"),
        ("together-llama", "chat"),
        ("groq-llama", "chat"),
        ("deepseek-chat", "chat"),
        ("llama3-local", "chat"),
        ("tgi", "completions"),
        ("vllm", "chat"),
        ("embed", "embeddings"),
    ];
    let names: Vec<&str> = served.iter().map(|s| s.0).collect();
    let gw = apply_and_serve(cp, &ns, &manifests, &names);
    for (route, route_type) in served {
        let (status, body) = call(&gw, route, route_type);
        assert_eq!(status, 200, "{route}: {body}\n{}", gw.log());
    }

    // gpt-4o: both deployments, weighted, then the fallback to claude.
    let gpt = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "gpt-4o"]);
    let backends: Vec<(String, Value, Value)> = gpt["spec"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["provider"].as_str().unwrap().to_string(),
                b["weight"].clone(),
                b["priority"].clone(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            ("azure-openai".to_string(), json!(3), Value::Null),
            ("openai".to_string(), json!(1), Value::Null),
            ("anthropic".to_string(), Value::Null, json!(1)),
        ],
        "{gpt}"
    );
    assert_eq!(gpt["spec"]["limits"][0]["calls"], 900);
    assert_eq!(gpt["spec"]["retry"]["attempts"], 3);
    // Both deployments take calls.
    sim.clear();
    for _ in 0..30 {
        assert_eq!(gw.chat("gpt-4o").0, 200);
    }
    let paths: Vec<String> = sim.requests().into_iter().map(|r| r.path).collect();
    assert!(paths.iter().any(|p| p.starts_with("/azure/")), "{paths:?}");
    assert!(paths.iter().any(|p| p.starts_with("/openai/")), "{paths:?}");
}

/// The commands of the README's "Migrating from MLflow / LiteLLM" section, on the example configs
/// it names (pointed at this test's simulated provider instead of the fixed port of `make run`).
#[test]
fn the_readme_migration_commands_work_on_the_examples() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    for command in [
        "portcullis import mlflow examples/migrate/mlflow-gateway.yaml --with-secrets | kubectl apply -f -",
        "portcullis import litellm examples/migrate/litellm-config.yaml --with-secrets | kubectl apply -f -",
    ] {
        assert!(readme.contains(command), "README lost {command:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    for (format, example, route) in [
        (
            "mlflow",
            "examples/migrate/mlflow-gateway.yaml",
            "mlflow-chat",
        ),
        (
            "litellm",
            "examples/migrate/litellm-config.yaml",
            "litellm-chat",
        ),
    ] {
        let text = std::fs::read_to_string(repo.join(example)).unwrap();
        let file = dir.path().join(format!("{format}.yaml"));
        std::fs::write(&file, text.replace("127.0.0.1:9090", &sim_addr(&sim))).unwrap();
        let ns = cp.namespace(&format!("readme-{format}"));
        // portcullis import <format> <file> --with-secrets | kubectl apply -f -
        let (code, manifests, stderr) = import(
            &[format, path_str(&file), "--with-secrets"],
            &[("OPENAI_API_KEY", "sk-readme")],
        );
        assert_eq!(code, Some(0), "{stderr}");
        let gw = apply_and_serve(cp, &ns, &manifests, &[route]);
        assert_eq!(gw.chat(route).0, 200, "{}", gw.log());
        assert_eq!(
            sim.last_request().unwrap().header("authorization"),
            Some("Bearer sk-readme")
        );
    }
}

#[test]
fn a_file_of_the_wrong_format_or_nothing_importable_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let litellm = dir.path().join("litellm.yaml");
    std::fs::write(
        &litellm,
        "model_list:\n  - {model_name: x, litellm_params: {model: vertex_ai/gemini-pro}}\n",
    )
    .unwrap();
    let (code, out, err) = import(&["mlflow", path_str(&litellm)], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty());
    assert!(err.contains("is not an MLflow gateway config"), "{err}");
    let (code, out, err) = import(&["litellm", path_str(&litellm)], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("\"vertex_ai/gemini-pro\": the provider is not supported"),
        "{err}"
    );
    assert!(err.contains("nothing to import"), "{err}");
    let (code, _, err) = import(&["litellm", "/nonexistent/config.yaml"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot read /nonexistent/config.yaml"),
        "{err}"
    );
}

/// A hostile config: an environment-variable name carrying a new line and a manifest must not
/// reach the output (it would be applied by `import | kubectl apply -f -`), and a key field naming
/// a local file is not read into a Secret unless `--read-key-files` says so.
#[test]
fn hostile_key_fields_neither_inject_manifests_nor_read_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local-secret");
    std::fs::write(&local, "sk-local-file-contents").unwrap();
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        &config,
        format!(
            r#"endpoints:
  - name: injected
    endpoint_type: llm/v1/chat
    model: {{provider: openai, name: m, config: {{openai_api_key: "$X\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: pwned}}\n"}}}}
  - name: filekey
    endpoint_type: llm/v1/chat
    model: {{provider: anthropic, name: m, config: {{anthropic_api_key: "{}"}}}}
"#,
            local.display()
        ),
    )
    .unwrap();
    let litellm = dir.path().join("litellm.yaml");
    std::fs::write(
        &litellm,
        "model_list:\n  - model_name: chat\n    litellm_params: {model: openai/m, api_key: \"os.environ/A\\n---\\nkind: Namespace\\nmetadata: {name: pwned}\"}\n",
    )
    .unwrap();
    for (format, file) in [("mlflow", &config), ("litellm", &litellm)] {
        let (code, stdout, stderr) = import(&[format, path_str(file), "--with-secrets"], &[]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!stdout.contains("pwned"), "{format}: {stdout}");
        assert!(!stdout.contains("Namespace"), "{format}: {stdout}");
        for doc in stdout.split("---\n").filter(|d| !d.trim().is_empty()) {
            let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
            let kind = v.get("kind").and_then(serde_yaml::Value::as_str);
            assert!(
                matches!(kind, None | Some("Secret" | "Route")),
                "{format}: {doc}"
            );
        }
        assert!(
            stderr.contains("not [A-Za-z_][A-Za-z0-9_]*"),
            "{format}: {stderr}"
        );
        // Without --with-secrets the suggested command holds no injected text either.
        let (_, stdout, _) = import(&[format, path_str(file)], &[]);
        assert!(!stdout.contains("pwned"), "{format}: {stdout}");
    }
    let (_, stdout, stderr) = import(&["mlflow", path_str(&config), "--with-secrets"], &[]);
    assert!(!stdout.contains("sk-local-file-contents"), "{stdout}");
    assert!(stderr.contains("--read-key-files"), "{stderr}");
    let (_, stdout, _) = import(
        &[
            "mlflow",
            path_str(&config),
            "--with-secrets",
            "--read-key-files",
        ],
        &[],
    );
    assert!(stdout.contains("sk-local-file-contents"), "{stdout}");
}
