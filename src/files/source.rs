//! The file source: reads the configured files, builds the routing table with the controller's
//! `reconcile`, and keeps it current.
//!
//! Hot reload polls (every 200 ms by default) instead of using inotify (`notify`): editors replace
//! files by rename, Kubernetes ConfigMap volumes swap a `..data` symlink, and network or container
//! filesystems may deliver no events at all; reading a few small files' bytes and comparing digests
//! sees every one of these the same way, needs no new dependency, and still applies a change in
//! well under a second. A change is applied once the bytes are the same on two consecutive looks,
//! so a file caught half-written is never served, and a file must be gone on two looks to count as
//! removed (an editor's save-by-rename is not a removal). SIGHUP re-reads everything at once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use tracing::{debug, info, warn};

use super::load::{self, FileContents, FileError, Origin};
use crate::access::{API_KEY_LABEL, ApiKeys, Digest, Identity, digest};
use crate::api::Route;
use crate::controller::consumers::key_digest;
use crate::controller::policy::OperatorPolicy;
use crate::controller::reconcile::{SecretData, reconcile_after};
use crate::cost::Prices;
use crate::dataplane::ConfigStatus;
use crate::server::{SourceHandles, StartError};
use crate::table::RoutingTable;

/// File names read from a configured directory.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// What wakes the reload loop besides its timer.
pub enum Wake {
    /// SIGHUP: re-read every file now.
    Reload,
    Stop,
}

pub struct FileSource {
    paths: Vec<PathBuf>,
    namespace: String,
    /// Per file: the digest of the bytes last parsed, and the last version that parsed.
    files: BTreeMap<PathBuf, Tracked>,
    /// Per file: the digest seen on the previous look (`None`: absent), to let changes settle.
    previous_look: HashMap<PathBuf, Option<Digest>>,
    generation: u64,
    /// The operator's egress rules and this gateway's own addresses, applied by reconcile.
    policy: OperatorPolicy,
    /// Where the table goes; `None` during the start-up check, before any port is bound.
    sink: Option<Sink>,
}

/// The data plane's side: the table and keys to publish, and the status to report.
pub struct Sink {
    pub handles: SourceHandles,
    pub status: Arc<ConfigStatus>,
}

struct Tracked {
    /// `None`: the file could not be read.
    parsed: Option<Digest>,
    good: Option<Arc<FileContents>>,
    /// Why the latest bytes were not applied.
    error: Option<String>,
}

/// The configured paths expanded to files: a directory gives its `.yaml`, `.yml` and `.json`
/// files (not hidden ones, not subdirectories), a file gives itself; missing paths are listed apart.
pub fn expand(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut files = Vec::new();
    let mut missing = Vec::new();
    for path in paths {
        if path.is_dir() {
            let Ok(entries) = std::fs::read_dir(path) else {
                missing.push(path.clone());
                continue;
            };
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
                    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
                    !name.starts_with('.') && EXTENSIONS.contains(&ext) && p.is_file()
                })
                .collect();
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            missing.push(path.clone());
        }
    }
    // A file named directly and through its directory is read once.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    (files, missing)
}

impl FileSource {
    pub fn new(paths: Vec<PathBuf>, namespace: String, policy: OperatorPolicy) -> Self {
        FileSource {
            paths,
            namespace,
            files: BTreeMap::new(),
            previous_look: HashMap::new(),
            generation: 0,
            policy,
            sink: None,
        }
    }

    /// The first load, before any port is bound: every file must be usable and some Route must
    /// serve, else the process exits 2 with the reasons (each invalid Route is logged).
    pub fn load_initial(&mut self) -> Result<(), StartError> {
        let (files, missing) = expand(&self.paths);
        let mut errors: Vec<String> = missing
            .iter()
            .map(|p| format!("{}: no such file or directory", p.display()))
            .collect();
        if files.is_empty() && errors.is_empty() {
            errors.push(format!(
                "no .yaml, .yml or .json files in {}",
                self.paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for path in files {
            match load::read(&path) {
                Ok(bytes) => {
                    let d = digest(&bytes);
                    self.previous_look.insert(path.clone(), Some(d));
                    match load::parse(&path, &bytes, &self.namespace) {
                        Ok(contents) => {
                            self.files.insert(
                                path,
                                Tracked {
                                    parsed: Some(d),
                                    good: Some(Arc::new(contents)),
                                    error: None,
                                },
                            );
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if !errors.is_empty() {
            return Err(StartError::Files(format!(
                "the configuration cannot be served:\n{}",
                errors.join("\n")
            )));
        }
        let (total, serving) = self.publish(true);
        if serving == 0 {
            return Err(StartError::Files(format!(
                "nothing to serve: none of the {total} Routes in the configuration is valid (the reasons are logged above)"
            )));
        }
        Ok(())
    }

    /// Publishes the loaded configuration to the data plane, which is ready from then on; the
    /// policy now knows the bound address (an `apiBase` there would loop).
    pub fn attach(&mut self, sink: Sink, policy: OperatorPolicy) {
        self.policy = policy;
        sink.status.set_last_error(None);
        let ready = sink.handles.ready.clone();
        self.sink = Some(sink);
        self.publish(false);
        ready.store(true, Ordering::Release);
    }

    /// Looks at the files until `Stop`: every `interval` (none when `None`) and on `Reload`.
    pub fn run(mut self, interval: Option<Duration>, wake: mpsc::Receiver<Wake>) {
        loop {
            let woken = match interval {
                Some(every) => wake.recv_timeout(every),
                None => wake
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match woken {
                Ok(Wake::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Wake::Reload) => {
                    info!("SIGHUP: reloading every configuration file");
                    self.look(true);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.look(false),
            }
        }
    }

    /// One look at the files; `force` re-parses all of them at once.
    pub fn look(&mut self, force: bool) {
        let (present, _) = expand(&self.paths);
        let mut now: HashMap<PathBuf, Result<Vec<u8>, FileError>> = HashMap::new();
        for path in present {
            let read = load::read(&path);
            now.insert(path, read);
        }
        let seen = |r: &Result<Vec<u8>, FileError>| r.as_ref().ok().map(|b| digest(b));
        let mut changed = false;
        let mut failed = false;

        // Removed: tracked, absent now and on the previous look.
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| {
                !now.contains_key(*p)
                    && (force || matches!(self.previous_look.get(*p), Some(None) | None))
            })
            .cloned()
            .collect();
        for path in gone {
            info!(file = %path.display(), "configuration file removed; its Routes and Secrets are gone");
            self.files.remove(&path);
            changed = true;
        }

        let mut paths: Vec<&PathBuf> = now.keys().collect();
        paths.sort();
        for path in paths {
            let result = &now[path];
            let digest_now = seen(result);
            let settled = force || self.previous_look.get(path).copied().flatten() == digest_now;
            let tracked = self.files.get(path);
            let is_new = tracked.is_none_or(|t| t.parsed != digest_now);
            if !(settled && (is_new || force)) {
                continue;
            }
            let parsed = match result {
                Ok(bytes) => load::parse(path, bytes, &self.namespace).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match parsed {
                Ok(contents) => {
                    info!(file = %path.display(), "configuration file loaded");
                    self.files.insert(
                        path.clone(),
                        Tracked {
                            parsed: digest_now,
                            good: Some(Arc::new(contents)),
                            error: None,
                        },
                    );
                    changed = true;
                }
                Err(e) => {
                    let keeps = tracked.is_some_and(|t| t.good.is_some());
                    warn!(
                        file = %path.display(),
                        error = %e,
                        "configuration file not applied; {}",
                        if keeps { "its last good version keeps serving" } else { "it has no good version yet" }
                    );
                    if let Some(sink) = &self.sink {
                        sink.handles.metrics.config_reload_failures.inc();
                    }
                    failed = true;
                    let good = self.files.get(path).and_then(|t| t.good.clone());
                    self.files.insert(
                        path.clone(),
                        Tracked {
                            parsed: digest_now,
                            good,
                            error: Some(e),
                        },
                    );
                }
            }
        }
        self.previous_look = now.iter().map(|(p, r)| (p.clone(), seen(r))).collect();

        if changed || failed || force {
            // Every file whose latest version is not serving, until it is fixed or removed.
            let errors: Vec<&str> = self
                .files
                .values()
                .filter_map(|t| t.error.as_deref())
                .collect();
            let failing = !errors.is_empty();
            if let Some(sink) = &self.sink {
                sink.status
                    .set_last_error(failing.then(|| errors.join("\n")));
                sink.handles
                    .metrics
                    .config_reload_failing
                    .set(i64::from(failing));
            }
        }
        if changed || force {
            self.publish(true);
        }
    }

    /// Builds the table from the last good version of every file and publishes it (when attached);
    /// `report` logs each left-out document and each Route that does not serve, with its origin.
    fn publish(&mut self, report: bool) -> (usize, usize) {
        let started = Instant::now();
        let mut routes: Vec<Arc<Route>> = Vec::new();
        let mut route_origin: HashMap<(String, String), Origin> = HashMap::new();
        let mut secrets: HashMap<(String, String), Arc<SecretData>> = HashMap::new();
        let mut secret_origin: HashMap<(String, String), Origin> = HashMap::new();
        let mut consumers: Vec<(Digest, Identity)> = Vec::new();
        for contents in self.files.values().filter_map(|t| t.good.as_ref()) {
            for problem in contents.problems.iter().filter(|_| report) {
                warn!(
                    file = %problem.origin.file.display(),
                    document = problem.origin.document,
                    entry = problem.origin.entry.as_deref().unwrap_or_default(),
                    reason = %problem.reason,
                    "left out of the configuration: {}: {}", problem.origin, problem.reason
                );
            }
            for (origin, route) in &contents.routes {
                let key = (route.namespace().unwrap_or_default(), route.name_any());
                if let Some(first) = route_origin.get(&key) {
                    if report {
                        warn!(
                            file = %origin.file.display(),
                            document = origin.document,
                            reason = "Duplicate",
                            "left out of the configuration: {origin}: Route {}/{} is already defined in {first}",
                            key.0, key.1
                        );
                    }
                    continue;
                }
                route_origin.insert(key, origin.clone());
                routes.push(route.clone());
            }
            for (origin, secret) in &contents.secrets {
                let key = (secret.namespace().unwrap_or_default(), secret.name_any());
                if let Some(first) = secret_origin.get(&key) {
                    if report {
                        warn!(
                            file = %origin.file.display(),
                            document = origin.document,
                            reason = "Duplicate",
                            "left out of the configuration: {origin}: Secret {}/{} is already defined in {first}",
                            key.0, key.1
                        );
                    }
                    continue;
                }
                if let Some(d) = api_key_consumer(secret) {
                    consumers.push((
                        d,
                        Identity::Consumer {
                            namespace: key.0.clone(),
                            name: key.1.clone(),
                        },
                    ));
                }
                let data: SecretData = secret.data.clone().unwrap_or_default();
                secret_origin.insert(key.clone(), origin.clone());
                secrets.insert(key, Arc::new(data));
            }
        }
        // Backend health (ejections) carries over from the table serving now, as in the controller.
        let reconciled = match &self.sink {
            Some(sink) => reconcile_after(
                &routes,
                &secrets,
                &sink.handles.table.load(),
                &self.policy,
                Prices::builtin(),
            ),
            None => reconcile_after(
                &routes,
                &secrets,
                &RoutingTable::default(),
                &self.policy,
                Prices::builtin(),
            ),
        };
        for o in reconciled
            .outcomes
            .iter()
            .filter(|o| report && !o.outcome.is_ready())
        {
            let origin = route_origin.get(&(o.namespace.clone(), o.name.clone()));
            warn!(
                file = %origin.map(|o| o.file.display().to_string()).unwrap_or_default(),
                document = origin.map(|o| o.document).unwrap_or_default(),
                entry = origin.and_then(|o| o.entry.as_deref()).unwrap_or_default(),
                route = %format!("{}/{}", o.namespace, o.name),
                reason = o.outcome.reason.as_str(),
                "route does not serve: {}: {}",
                origin.map(ToString::to_string).unwrap_or_default(),
                o.outcome.message
            );
        }
        let consumers_n = consumers.len();
        let (total, serving) = (
            reconciled.outcomes.len(),
            reconciled
                .outcomes
                .iter()
                .filter(|o| o.outcome.is_ready())
                .count(),
        );
        let Some(sink) = &self.sink else {
            return (total, serving);
        };
        sink.handles
            .api_keys
            .store(Arc::new(ApiKeys::new(consumers)));
        let metrics = &sink.handles.metrics;
        reconciled.record(metrics, started.elapsed());
        sink.handles.table.store(Arc::new(reconciled.table));
        self.generation += 1;
        sink.status.set_generation(self.generation);
        metrics.config_generation.set(self.generation as i64);
        info!(
            generation = self.generation,
            files = self.files.len(),
            routes = total,
            ready = serving,
            consumers = consumers_n,
            "configuration applied"
        );
        debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "routing table rebuilt from files"
        );
        (total, serving)
    }
}

/// The key digest of a Secret labelled as an API-key consumer.
fn api_key_consumer(secret: &Secret) -> Option<Digest> {
    let labelled = secret
        .labels()
        .get(API_KEY_LABEL)
        .is_some_and(|v| v == "true");
    if labelled { key_digest(secret) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limiter;
    use crate::telemetry::metrics::Metrics;

    const SECRET: &str =
        "apiVersion: v1\nkind: Secret\nmetadata: {name: k}\nstringData: {apiKey: sk-1}\n";

    fn route(name: &str) -> String {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {{name: {name}}}\nspec: {{routeType: llm/v1/chat, model: {{provider: openai, name: m, secretRef: {{name: k}}}}}}\n"
        )
    }

    fn attached(dir: &std::path::Path) -> (FileSource, SourceHandles, Arc<ConfigStatus>) {
        let mut source = FileSource::new(
            vec![dir.to_path_buf()],
            "default".into(),
            OperatorPolicy::default(),
        );
        source.load_initial().unwrap();
        let metrics = Arc::new(Metrics::new());
        let handles = SourceHandles {
            table: crate::table::RoutingTable::default().shared(),
            ready: Default::default(),
            metrics: metrics.clone(),
            api_keys: Default::default(),
            limits: Arc::new(Limiter::local(metrics, 1)),
        };
        let status = Arc::new(ConfigStatus::default());
        source.attach(
            Sink {
                handles: handles.clone(),
                status: status.clone(),
            },
            OperatorPolicy::default(),
        );
        (source, handles, status)
    }

    fn names(handles: &SourceHandles) -> Vec<String> {
        handles
            .table
            .load()
            .routes()
            .iter()
            .map(|r| r.name.to_string())
            .collect()
    }

    #[test]
    fn directories_give_their_config_files_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.yaml", "a.yml", "c.json", "notes.md", ".hidden.yaml"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let missing = dir.path().join("nope.yaml");
        let (files, gone) = expand(&[dir.path().to_path_buf(), missing.clone()]);
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.yml", "b.yaml", "c.json"]);
        assert_eq!(gone, [missing]);
    }

    #[test]
    fn changes_apply_once_settled_and_removals_once_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            [SECRET, &route("one")].join("---\n"),
        )
        .unwrap();
        let (mut source, handles, status) = attached(dir.path());
        assert_eq!(names(&handles), ["one"]);
        assert_eq!(status.generation(), 1);
        assert!(handles.ready.load(Ordering::Acquire));

        std::fs::write(dir.path().join("b.yaml"), route("two")).unwrap();
        source.look(false);
        assert_eq!(names(&handles), ["one"], "not settled after one look");
        source.look(false);
        assert_eq!(names(&handles), ["one", "two"]);
        assert_eq!(status.generation(), 2);
        source.look(false);
        assert_eq!(status.generation(), 2, "nothing changed, nothing published");

        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        source.look(false);
        assert_eq!(names(&handles), ["one", "two"], "gone on one look only");
        source.look(false);
        assert_eq!(names(&handles), ["one"]);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_version_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, [SECRET, &route("one")].join("---\n")).unwrap();
        let (mut source, handles, status) = attached(dir.path());
        std::fs::write(&file, "routes: [\n").unwrap();
        source.look(false);
        source.look(false);
        assert_eq!(names(&handles), ["one"]);
        let error = status.last_error().unwrap();
        assert!(error.contains("a.yaml is not valid YAML"), "{error}");
        assert_eq!(handles.metrics.config_reload_failing.get(), 1);
        source.look(false);
        assert_eq!(
            handles.metrics.config_reload_failures.get(),
            1,
            "reported once"
        );

        std::fs::write(&file, [SECRET, &route("fixed")].join("---\n")).unwrap();
        source.look(false);
        source.look(false);
        assert_eq!(names(&handles), ["fixed"]);
        assert_eq!(status.last_error(), None);
        assert_eq!(handles.metrics.config_reload_failing.get(), 0);
    }

    #[test]
    fn a_forced_reload_applies_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            [SECRET, &route("one")].join("---\n"),
        )
        .unwrap();
        let (mut source, handles, status) = attached(dir.path());
        std::fs::write(dir.path().join("b.yaml"), route("two")).unwrap();
        source.look(true);
        assert_eq!(names(&handles), ["one", "two"]);
        assert_eq!(status.generation(), 2);
    }

    #[test]
    fn nothing_valid_is_refused_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), route("orphan")).unwrap();
        let err = FileSource::new(
            vec![dir.path().to_path_buf()],
            "default".into(),
            OperatorPolicy::default(),
        )
        .load_initial()
        .unwrap_err();
        assert!(err.to_string().contains("nothing to serve"), "{err}");
        assert_eq!(err.exit_code(), std::process::ExitCode::from(2));
        let empty = tempfile::tempdir().unwrap();
        let err = FileSource::new(
            vec![empty.path().to_path_buf()],
            "default".into(),
            OperatorPolicy::default(),
        )
        .load_initial()
        .unwrap_err();
        assert!(
            err.to_string().contains("no .yaml, .yml or .json files"),
            "{err}"
        );
    }
}
