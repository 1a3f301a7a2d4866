//! Route and Secret manifests, as a cluster would get them: one object per YAML document (a
//! `kind: List` counts as its items). Secrets are normalised as the API server does: `stringData`
//! is merged over `data`.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde_yaml::Value;

use crate::api::Route;

pub const ROUTE_API_VERSION: &str = "portcullis.dev/v1alpha1";

pub enum Object {
    Route(Box<Route>),
    Secret(Box<Secret>),
}

/// The objects of one document, or why it cannot be served. Messages never echo Secret values.
pub fn objects(doc: Value, namespace: &str) -> Result<Vec<Object>, String> {
    let text = |key: &str| doc.get(key).and_then(Value::as_str).map(str::to_string);
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    match (api_version.as_deref(), kind.as_deref()) {
        (Some(ROUTE_API_VERSION), Some("Route")) => {
            let mut route: Route =
                serde_yaml::from_value(doc).map_err(|e| format!("not a valid Route: {e}"))?;
            let name = route.metadata.name.clone().unwrap_or_default();
            if name.is_empty() {
                return Err("the Route has no metadata.name".into());
            }
            route
                .metadata
                .namespace
                .get_or_insert_with(|| namespace.to_string());
            route.status = None;
            Ok(vec![Object::Route(Box::new(route))])
        }
        (Some("v1"), Some("Secret")) => {
            let mut secret: Secret = serde_yaml::from_value(doc).map_err(|_| {
                "not a valid v1 Secret (data values must be base64, stringData values text)"
                    .to_string()
            })?;
            if secret
                .metadata
                .name
                .as_deref()
                .unwrap_or_default()
                .is_empty()
            {
                return Err("the Secret has no metadata.name".into());
            }
            secret
                .metadata
                .namespace
                .get_or_insert_with(|| namespace.to_string());
            let string_data = secret.string_data.take().unwrap_or_default();
            let data = secret.data.get_or_insert_with(Default::default);
            for (k, v) in string_data {
                data.insert(k, ByteString(v.into_bytes()));
            }
            Ok(vec![Object::Secret(Box::new(secret))])
        }
        (Some("v1"), Some("List")) => {
            let items = match doc.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => Vec::new(),
            };
            let mut all = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                all.extend(objects(item, namespace).map_err(|e| format!("items[{i}]: {e}"))?);
            }
            Ok(all)
        }
        (Some(v), Some(k)) => Err(format!(
            "kind {k} ({v}) is not served from files; only {ROUTE_API_VERSION} Route and v1 Secret are"
        )),
        _ => Err("not a Kubernetes object (no apiVersion and kind)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(yaml: &str) -> Result<Vec<Object>, String> {
        objects(serde_yaml::from_str(yaml).unwrap(), "default")
    }

    #[test]
    fn routes_get_the_default_namespace() {
        let objs = one(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {name: chat}\nspec:\n  routeType: llm/v1/chat\n  model: {provider: openai, name: gpt-4o-mini, secretRef: {name: k}}\n",
        )
        .unwrap();
        let Object::Route(r) = &objs[0] else { panic!() };
        assert_eq!(r.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            r.spec
                .model
                .as_ref()
                .unwrap()
                .secret_ref
                .as_ref()
                .unwrap()
                .key,
            "apiKey"
        );
    }

    #[test]
    fn string_data_wins_over_data() {
        let objs = one(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: k, namespace: team}\ndata: {apiKey: b2xk, other: eA==}\nstringData: {apiKey: new}\n",
        )
        .unwrap();
        let Object::Secret(s) = &objs[0] else {
            panic!()
        };
        let data = s.data.as_ref().unwrap();
        assert_eq!(data["apiKey"].0, b"new");
        assert_eq!(data["other"].0, b"x");
        assert_eq!(s.metadata.namespace.as_deref(), Some("team"));
    }

    #[test]
    fn invalid_documents_say_why_without_values() {
        let e = one("apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {name: x}\nspec: {routeType: llm/v1/chat, model: {provider: palm, name: m}}\n")
            .err()
            .unwrap();
        assert!(e.contains("not a valid Route") && e.contains("palm"), "{e}");
        let e = one(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: k}\ndata: {apiKey: 'sk-not-base64!'}\n",
        )
        .err()
        .unwrap();
        assert!(!e.contains("sk-not-base64"), "{e}");
        let e = one("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
            .err()
            .unwrap();
        assert!(e.contains("kind ConfigMap (v1) is not served"), "{e}");
    }
}
