//! The model repository: folders of models with `config.toml` and numbered
//! version folders, loaded and unloaded by control mode (none, poll, explicit).
//!
//! Readers (every request) take a snapshot of the model table without locking;
//! load, unload and poll are serialised by one control mutex and publish a new
//! table when done, so an old version serves until its replacement is ready and
//! in-flight requests keep the `Arc` of the version they started on.

use crate::ensemble::EnsembleFactory;
use crate::metrics::Metrics;
use crate::model::LoadedModel;
use arc_swap::ArcSwap;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wisp_core::backend::{Backend, BackendRegistry, LoadContext};
use wisp_core::config::{BackendKind, ModelConfig};
use wisp_core::error::{Error, ErrorKind, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Load every model at startup; the repository API cannot load or unload.
    None,
    /// Like none, and reload models whose files change, every `--repository-poll-secs`.
    Poll,
    /// Load only `--load-model` models at startup; the repository API loads and unloads.
    Explicit,
}

impl ControlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Poll => "poll",
            ControlMode::Explicit => "explicit",
        }
    }
}

impl std::fmt::Display for ControlMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ControlMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(ControlMode::None),
            "poll" => Ok(ControlMode::Poll),
            "explicit" => Ok(ControlMode::Explicit),
            other => Err(format!(
                "unknown model control mode '{other}' (none, poll or explicit)"
            )),
        }
    }
}

/// How an ensemble reaches the models its steps name: the ready version of a
/// model, by name. The repository is one; tests may use another.
pub trait ModelLookup: Send + Sync {
    fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>>;
}

#[derive(Clone)]
pub enum VersionState {
    Ready(Arc<LoadedModel>),
    Unavailable(String),
}

/// What the repository knows of one model folder.
#[derive(Clone, Default)]
pub struct ModelEntry {
    pub versions: BTreeMap<u64, VersionState>,
    /// Why the model as a whole is not (fully) loaded: a config error, "unloaded".
    pub reason: Option<String>,
    /// Fingerprint of the whole folder when it was last loaded (poll mode compares it).
    folder_fingerprint: u64,
    /// Fingerprint per loaded version (config + that version's files), to reuse unchanged ones.
    version_fingerprints: BTreeMap<u64, u64>,
}

pub struct Repository {
    root: PathBuf,
    mode: ControlMode,
    /// Backend factories by config name; "ensemble" is added by the repository itself.
    backends: BackendRegistry,
    metrics: Arc<Metrics>,
    models: ArcSwap<HashMap<String, Arc<ModelEntry>>>,
    /// Serialises load, unload and poll against each other.
    control: tokio::sync::Mutex<()>,
    /// Serialises publishing a new table (models of one startup load in parallel).
    publishing: parking_lot::Mutex<()>,
}

/// Rejects names that are not a plain folder name (no separators, no `..`).
fn check_model_name(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.starts_with('.');
    if plain {
        Ok(())
    } else {
        Err(Error::invalid(format!("invalid model name '{name}'")))
    }
}

fn hash_folder(dir: &Path, hasher: &mut std::collections::hash_map::DefaultHasher) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = read.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Ok(meta) = entry.metadata() else { continue };
        entry.file_name().hash(hasher);
        if meta.is_dir() {
            hash_folder(&entry.path(), hasher);
        } else {
            meta.len().hash(hasher);
            if let Ok(modified) = meta.modified() {
                modified.hash(hasher);
            }
        }
    }
}

fn text_fingerprint(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish() | 1
}

/// Files up to this size are fingerprinted by content.
const CONTENT_HASH_LIMIT: u64 = 16 << 20;

fn fingerprint(paths: &[&Path]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => hash_folder(path, &mut hasher),
            Ok(meta) => {
                meta.len().hash(&mut hasher);
                if let Ok(m) = meta.modified() {
                    m.hash(&mut hasher);
                }
                // Configs and components are hashed; large weight files are identified
                // by size and modification time (reading a gigabyte every poll is not).
                if meta.len() <= CONTENT_HASH_LIMIT {
                    std::fs::read(path).unwrap_or_default().hash(&mut hasher);
                }
            }
            Err(_) => 0u8.hash(&mut hasher),
        }
    }
    hasher.finish()
}

/// Numbered version folders of a model folder.
fn version_folders(dir: &Path) -> Vec<u64> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    read.flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("loading task failed: {e}")))
}

impl ModelLookup for Repository {
    fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>> {
        Repository::get(self, name, version)
    }
}

impl Repository {
    pub fn new(
        root: PathBuf,
        mode: ControlMode,
        backends: BackendRegistry,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>> {
        if !root.is_dir() {
            return Err(Error::invalid(format!(
                "model repository {} is not a folder",
                root.display()
            )));
        }
        let repository = Arc::new_cyclic(|me: &std::sync::Weak<Repository>| {
            // Ensembles reach their steps' models through a weak reference: no cycle.
            let lookup: std::sync::Weak<dyn ModelLookup> = me.clone();
            let mut backends = backends;
            backends.register(
                BackendKind::Ensemble.as_str(),
                Arc::new(EnsembleFactory::new(lookup, metrics.clone())),
            );
            Repository {
                root,
                mode,
                backends,
                metrics,
                models: ArcSwap::from_pointee(HashMap::new()),
                control: tokio::sync::Mutex::new(()),
                publishing: parking_lot::Mutex::new(()),
            }
        });
        let collector = OutOfServiceCollector::new(Arc::downgrade(&repository));
        if let Err(e) = repository.metrics.register(Box::new(collector)) {
            tracing::warn!("{e}");
        }
        Ok(repository)
    }

    pub fn mode(&self) -> ControlMode {
        self.mode
    }

    /// Model folders in the repository, sorted.
    pub fn folder_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|read| {
                read.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| check_model_name(n).is_ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Triton's unknown-model error unless `name` is a model of the repository, loaded
    /// or not (settings may name a model before it loads).
    pub fn check_known(&self, name: &str) -> Result<()> {
        let known = self.models.load().contains_key(name)
            || (check_model_name(name).is_ok() && self.root.join(name).is_dir());
        if known {
            Ok(())
        } else {
            Err(Error::unknown_model(name, None))
        }
    }

    /// The ready model for `name` and `version` (latest ready version when none).
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedModel>> {
        let models = self.models.load();
        let entry = models
            .get(name)
            .ok_or_else(|| Error::unknown_model(name, None))?;
        match version {
            Some(v) => match entry.versions.get(&v) {
                Some(VersionState::Ready(model)) => match model.unavailable_reason() {
                    None => Ok(model.clone()),
                    Some(reason) => Err(Error::unavailable(format!(
                        "version {v} of model '{name}' is not ready: {reason}"
                    ))),
                },
                Some(VersionState::Unavailable(reason)) => Err(Error::unavailable(format!(
                    "version {v} of model '{name}' is not ready: {reason}"
                ))),
                None => Err(Error::unknown_model(name, Some(v))),
            },
            None => entry
                .versions
                .values()
                .rev()
                .find_map(|s| match s {
                    VersionState::Ready(m) if m.unavailable_reason().is_none() => Some(m.clone()),
                    _ => None,
                })
                .ok_or_else(|| {
                    let reason = entry.reason.clone().or_else(|| {
                        entry.versions.values().find_map(|s| match s {
                            VersionState::Unavailable(r) => Some(r.clone()),
                            VersionState::Ready(m) => m.unavailable_reason(),
                        })
                    });
                    Error::unavailable(format!(
                        "model '{name}' has no ready version: {}",
                        reason.unwrap_or_else(|| "not loaded".into())
                    ))
                }),
        }
    }

    /// Whether every model the repository should serve is ready: no failure
    /// reason and every selected version ready (models unloaded on request do not count).
    pub fn all_ready(&self) -> bool {
        self.models.load().values().all(|e| {
            e.reason.as_deref() == Some("unloaded")
                || (e.reason.is_none()
                    && e.versions.values().all(
                        |s| matches!(s, VersionState::Ready(m) if m.unavailable_reason().is_none()),
                    ))
        })
    }

    /// Models that are ready, as (name, version) pairs.
    pub fn ready_models(&self) -> Vec<Arc<LoadedModel>> {
        let models = self.models.load();
        let mut ready: Vec<Arc<LoadedModel>> = models
            .values()
            .flat_map(|e| e.versions.values())
            .filter_map(|s| match s {
                VersionState::Ready(m) => Some(m.clone()),
                VersionState::Unavailable(_) => None,
            })
            .collect();
        ready.sort_by(|a, b| (a.name(), a.version).cmp(&(b.name(), b.version)));
        ready
    }

    /// Triton's repository index.
    pub fn index(&self, ready_only: bool) -> Value {
        let models = self.models.load();
        let mut rows = Vec::new();
        let mut names = self.folder_names();
        for name in models.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        for name in names {
            match models.get(&name) {
                Some(entry) if !entry.versions.is_empty() => {
                    for (version, state) in &entry.versions {
                        let (state, reason) = match state {
                            // A ready version whose reload failed says why it is still the old one.
                            VersionState::Ready(m) => match m.unavailable_reason() {
                                Some(reason) => ("UNAVAILABLE", reason),
                                None => ("READY", entry.reason.clone().unwrap_or_default()),
                            },
                            VersionState::Unavailable(r) => ("UNAVAILABLE", r.clone()),
                        };
                        if ready_only && state != "READY" {
                            continue;
                        }
                        rows.push(json!({"name": name, "version": version.to_string(), "state": state, "reason": reason}));
                    }
                }
                Some(entry) if !ready_only => {
                    rows.push(json!({"name": name, "state": "UNAVAILABLE", "reason": entry.reason.clone().unwrap_or_default()}));
                }
                None if !ready_only => rows.push(json!({"name": name})),
                _ => {}
            }
        }
        Value::Array(rows)
    }

    /// Loads everything at startup as the control mode says. Models load in
    /// parallel (a few at a time), so one slow model (a plugin whose `init` takes
    /// its whole timeout) does not hold back the others; ensembles load after
    /// every other model, since they check their steps against them.
    pub async fn load_startup(self: &Arc<Self>, explicit: &[String]) {
        let _control = self.control.lock().await;
        let names = match self.mode {
            ControlMode::Explicit if !explicit.iter().any(|n| n == "*") => explicit.to_vec(),
            _ => self.folder_names(),
        };
        let is_ensemble = |name: &String| {
            ModelConfig::load(&self.root.join(name), name)
                .is_ok_and(|c| c.backend == BackendKind::Ensemble)
        };
        let (ensembles, models): (Vec<String>, Vec<String>) =
            names.into_iter().partition(is_ensemble);
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut loading = tokio::task::JoinSet::new();
        for name in models {
            let (me, slots) = (self.clone(), slots.clone());
            loading.spawn(async move {
                let _slot = slots.acquire_owned().await;
                if let Err(e) = me.load_checked(&name).await {
                    tracing::error!(model = %name, "failed to load: {e}");
                }
            });
        }
        while loading.join_next().await.is_some() {}
        // Ensembles one at a time, in name order: an ensemble may use another.
        for name in ensembles {
            if let Err(e) = self.load_checked(&name).await {
                tracing::error!(model = %name, "failed to load: {e}");
            }
        }
    }

    /// [`Repository::load_locked`] for a name that has not been checked yet.
    async fn load_checked(&self, name: &str) -> Result<()> {
        check_model_name(name)?;
        self.load_locked(name).await
    }

    /// Loads (or reloads) a model: the versions its policy selects; unchanged
    /// ready versions are kept as they are.
    pub async fn load(&self, name: &str) -> Result<()> {
        self.load_with(name, None).await
    }

    /// `load`, with Triton's configuration override (`parameters.config` of a load
    /// request, Triton's JSON) applied over config.toml for this load; a later load
    /// without one goes back to config.toml.
    pub async fn load_with(&self, name: &str, config_override: Option<String>) -> Result<()> {
        check_model_name(name)?;
        let _control = self.control.lock().await;
        // Triton's wording, which its clients' model-control examples look for.
        self.load_locked_with(name, config_override)
            .await
            .map_err(|e| e.context(format!("failed to load '{name}'")))
    }

    async fn load_locked(&self, name: &str) -> Result<()> {
        self.load_locked_with(name, None).await
    }

    async fn load_locked_with(&self, name: &str, config_override: Option<String>) -> Result<()> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "no model folder '{name}' in repository {}",
                self.root.display()
            )));
        }
        let old = self.models.load().get(name).cloned().unwrap_or_default();
        if !self.models.load().contains_key(name) {
            // Known while it loads: requests get 503 "loading", not 404.
            self.publish(
                name,
                Some(ModelEntry {
                    reason: Some("loading".into()),
                    ..Default::default()
                }),
            );
        }
        let folder_fingerprint = {
            let dir = dir.clone();
            blocking(move || fingerprint(&[&dir])).await?
        };
        let config_result = {
            let (dir, name, config) = (dir.clone(), name.to_string(), config_override.clone());
            blocking(move || ModelConfig::load_with_override(&dir, &name, config.as_deref()))
                .await?
        };
        let config = match config_result {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // Keep serving what was ready; record why the new files failed.
                let mut entry = (*old).clone();
                entry.reason = Some(e.message.clone());
                entry.folder_fingerprint = folder_fingerprint;
                self.publish(name, Some(entry));
                return Err(Error::invalid(format!(
                    "model '{name}' failed to load: {}",
                    e.message
                )));
            }
        };
        let available = version_folders(&dir);
        let selected = config.version_policy.select(&available);
        if selected.is_empty() {
            let message = format!(
                "{}: no version folder matches version_policy {:?} (found {:?})",
                dir.display(),
                config.version_policy,
                {
                    let mut a = available.clone();
                    a.sort();
                    a
                }
            );
            let mut entry = (*old).clone();
            entry.reason = Some(message.clone());
            entry.folder_fingerprint = folder_fingerprint;
            self.publish(name, Some(entry));
            return Err(Error::invalid(format!(
                "model '{name}' failed to load: {message}"
            )));
        }

        let config_path = dir.join("config.toml");
        let mut entry = ModelEntry {
            folder_fingerprint,
            ..Default::default()
        };
        let mut failures = Vec::new();
        for version in selected {
            let version_dir = dir.join(version.to_string());
            // An override is part of the configuration: loading with one, or back
            // without it, rebuilds the version.
            let version_fingerprint = fingerprint(&[&config_path, &version_dir])
                ^ config_override.as_deref().map_or(0, text_fingerprint);
            if let (Some(VersionState::Ready(model)), Some(&fp)) = (
                old.versions.get(&version),
                old.version_fingerprints.get(&version),
            ) {
                if fp == version_fingerprint {
                    entry
                        .versions
                        .insert(version, VersionState::Ready(model.clone()));
                    entry.version_fingerprints.insert(version, fp);
                    continue;
                }
            }
            let state = match self
                .create_backend(config.clone(), version, version_dir)
                .await
            {
                Ok(backend) => {
                    tracing::info!(model = name, version, "model version ready");
                    VersionState::Ready(Arc::new(LoadedModel::new(
                        config.clone(),
                        version,
                        backend,
                        self.metrics.clone(),
                    )))
                }
                Err(e) => {
                    tracing::error!(model = name, version, "model version failed to load: {e}");
                    failures.push(format!("version {version}: {}", e.message));
                    match old.versions.get(&version) {
                        // A failed reload leaves the loaded version serving (Triton's rule);
                        // its old fingerprint makes poll mode try the new files again.
                        Some(ready @ VersionState::Ready(_)) => {
                            entry.versions.insert(version, ready.clone());
                            if let Some(&fp) = old.version_fingerprints.get(&version) {
                                entry.version_fingerprints.insert(version, fp);
                            }
                            continue;
                        }
                        _ => VersionState::Unavailable(e.message),
                    }
                }
            };
            entry.versions.insert(version, state);
            entry
                .version_fingerprints
                .insert(version, version_fingerprint);
        }
        let any_ready = |e: &ModelEntry| {
            e.versions
                .values()
                .any(|s| matches!(s, VersionState::Ready(_)))
        };
        if !failures.is_empty() {
            entry.reason = Some(format!("reload failed: {}", failures.join("; ")));
            if !any_ready(&entry) {
                // Nothing new is ready: versions the policy dropped keep serving until something is.
                for (version, state) in &old.versions {
                    if matches!(state, VersionState::Ready(_)) {
                        entry
                            .versions
                            .entry(*version)
                            .or_insert_with(|| state.clone());
                        if let Some(&fp) = old.version_fingerprints.get(version) {
                            entry.version_fingerprints.entry(*version).or_insert(fp);
                        }
                    }
                }
            }
        }
        self.publish(name, Some(entry));
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("model '{name}' failed to load: {}", failures.join("; ")),
            ))
        }
    }

    async fn create_backend(
        &self,
        config: Arc<ModelConfig>,
        version: u64,
        dir: PathBuf,
    ) -> Result<Box<dyn Backend>> {
        let factory = self.backends.get(config.backend.as_str())?;
        blocking(move || {
            factory.load(&LoadContext {
                config: &config,
                version,
                version_dir: &dir,
            })
        })
        .await?
    }

    /// Unloads every version of a model; requests in flight finish on the versions they hold.
    pub async fn unload(&self, name: &str) -> Result<()> {
        check_model_name(name)?;
        let _control = self.control.lock().await;
        let old = self
            .models
            .load()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("model '{name}' is not loaded")))?;
        let mut entry = ModelEntry {
            reason: Some("unloaded".into()),
            ..Default::default()
        };
        for version in old.versions.keys() {
            entry
                .versions
                .insert(*version, VersionState::Unavailable("unloaded".into()));
        }
        self.publish(name, Some(entry));
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    /// Poll mode: loads new and changed folders, unloads removed ones.
    pub async fn poll(&self) {
        let _control = self.control.lock().await;
        let folders = self.folder_names();
        let current = self.models.load_full();
        for name in &folders {
            let dir = self.root.join(name);
            let now = {
                let dir = dir.clone();
                blocking(move || fingerprint(&[&dir]))
                    .await
                    .unwrap_or_default()
            };
            let changed = current
                .get(name)
                .is_none_or(|e| e.folder_fingerprint != now);
            if changed {
                tracing::info!(model = %name, "model folder changed, reloading");
                if let Err(e) = self.load_locked(name).await {
                    tracing::error!(model = %name, "reload failed: {e}");
                }
            }
        }
        for name in current.keys().filter(|n| !folders.contains(n)) {
            tracing::info!(model = %name, "model folder removed, unloading");
            self.publish(name, None);
        }
    }

    /// Swaps in a new entry for `name` and keeps the ready gauge true.
    fn publish(&self, name: &str, entry: Option<ModelEntry>) {
        let _publishing = self.publishing.lock();
        let mut table = HashMap::clone(&self.models.load());
        let old = match entry {
            Some(entry) => table.insert(name.to_string(), Arc::new(entry)),
            None => table.remove(name),
        };
        let ready = |e: Option<&Arc<ModelEntry>>| -> Vec<u64> {
            e.map(|e| {
                e.versions
                    .iter()
                    .filter(|(_, s)| matches!(s, VersionState::Ready(_)))
                    .map(|(v, _)| *v)
                    .collect()
            })
            .unwrap_or_default()
        };
        let (before, after) = (ready(old.as_ref()), ready(table.get(name)));
        for v in before.iter().filter(|v| !after.contains(v)) {
            self.metrics
                .model_ready
                .with_label_values(&[name, &v.to_string()])
                .set(0);
        }
        for v in &after {
            self.metrics
                .model_ready
                .with_label_values(&[name, &v.to_string()])
                .set(1);
        }
        self.models.store(Arc::new(table));
    }
}

/// Loads, reloads and ensemble checks without the server binary: a fake backend
/// factory stands in for Wasm.
/// `wisp_model_instances_out_of_service{model,version}`, read from the ready versions'
/// backends at every scrape (instances leave service on their own threads).
struct OutOfServiceCollector {
    repository: std::sync::Weak<Repository>,
    desc: prometheus::core::Desc,
}

impl OutOfServiceCollector {
    const NAME: &'static str = "wisp_model_instances_out_of_service";
    const HELP: &'static str =
        "Instances taken out of service for good (a poisoned GPU context); the version is not ready when all are";

    fn new(repository: std::sync::Weak<Repository>) -> Self {
        let desc = prometheus::core::Desc::new(
            Self::NAME.into(),
            Self::HELP.into(),
            vec!["model".into(), "version".into()],
            HashMap::new(),
        )
        .expect("valid metric");
        OutOfServiceCollector { repository, desc }
    }
}

impl prometheus::core::Collector for OutOfServiceCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(repository) = self.repository.upgrade() else {
            return Vec::new();
        };
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(Self::NAME, Self::HELP),
            &["model", "version"],
        )
        .expect("valid metric");
        for model in repository.ready_models() {
            gauge
                .with_label_values(&[model.name(), &model.version.to_string()])
                .set(model.instances_out_of_service() as i64);
        }
        prometheus::core::Collector::collect(&gauge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wisp_core::backend::{
        BackendRequest, BackendResponse, BoxFuture, Execution, ExecutionTimes,
    };

    struct Echo;

    impl Backend for Echo {
        fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
            Box::pin(async move {
                Execution {
                    results: requests
                        .into_iter()
                        .map(|r| {
                            Ok(BackendResponse {
                                outputs: r.inputs,
                                parameters: Vec::new(),
                            })
                        })
                        .collect(),
                    times: ExecutionTimes::default(),
                }
            })
        }
    }

    struct EchoFactory;

    impl wisp_core::backend::BackendFactory for EchoFactory {
        fn load(&self, _: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
            Ok(Box::new(Echo))
        }
    }

    const ECHO: &str = "backend = \"wasm\"\nmax_batch_size = 0\n\
        [[input]]\nname = \"X\"\ndatatype = \"INT32\"\ndims = [1]\n\
        [[output]]\nname = \"X\"\ndatatype = \"INT32\"\ndims = [1]\n";

    fn ensemble_of(step: &str) -> String {
        format!(
            "backend = \"ensemble\"\nmax_batch_size = 0\n\
             [[input]]\nname = \"X\"\ndatatype = \"INT32\"\ndims = [1]\n\
             [[output]]\nname = \"Y\"\ndatatype = \"INT32\"\ndims = [1]\n\
             [[step]]\nmodel = \"{step}\"\ninput_map = {{ X = \"X\" }}\noutput_map = {{ {out} = \"Y\" }}\n",
            out = if step == "echo" { "X" } else { "Y" }
        )
    }

    fn write(root: &Path, name: &str, config: &str) {
        std::fs::create_dir_all(root.join(name).join("1")).unwrap();
        std::fs::write(root.join(name).join("config.toml"), config).unwrap();
    }

    fn repository(root: &Path) -> Arc<Repository> {
        let mut backends = BackendRegistry::new();
        backends.register("wasm", Arc::new(EchoFactory));
        Repository::new(
            root.to_path_buf(),
            ControlMode::Explicit,
            backends,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    /// Two instances, of which `out` are out of service (as a poisoned GPU leaves them).
    struct Failing(Arc<std::sync::atomic::AtomicUsize>);

    impl Backend for Failing {
        fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
            Echo.execute(requests)
        }
        fn instances(&self) -> usize {
            2
        }
        fn out_of_service(&self) -> wisp_core::worker::OutOfService {
            let instances = self.0.load(std::sync::atomic::Ordering::SeqCst);
            wisp_core::worker::OutOfService {
                instances,
                reason: (instances > 0).then(|| "CUDA_ERROR_ILLEGAL_ADDRESS".into()),
            }
        }
    }

    struct FailingFactory(Arc<std::sync::atomic::AtomicUsize>);

    impl wisp_core::backend::BackendFactory for FailingFactory {
        fn load(&self, _: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
            Ok(Box::new(Failing(self.0.clone())))
        }
    }

    #[tokio::test]
    async fn a_version_with_every_instance_out_of_service_is_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "gpu", &ECHO.replace("\"wasm\"", "\"encoder\""));
        let out = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut backends = BackendRegistry::new();
        backends.register("encoder", Arc::new(FailingFactory(out.clone())));
        let metrics = Arc::new(Metrics::new());
        let repo = Repository::new(
            dir.path().to_path_buf(),
            ControlMode::Explicit,
            backends,
            metrics.clone(),
        )
        .unwrap();
        repo.load("gpu").await.unwrap();
        let gauge = |n: usize| {
            format!("wisp_model_instances_out_of_service{{model=\"gpu\",version=\"1\"}} {n}")
        };
        assert!(metrics.render().contains(&gauge(0)));
        out.store(1, std::sync::atomic::Ordering::SeqCst);
        assert!(
            repo.get("gpu", Some(1)).is_ok(),
            "one instance still serves"
        );
        assert!(repo.all_ready());
        assert!(metrics.render().contains(&gauge(1)));
        out.store(2, std::sync::atomic::Ordering::SeqCst);
        for version in [Some(1), None] {
            let e = repo.get("gpu", version).err().unwrap();
            assert_eq!(e.kind, wisp_core::ErrorKind::Unavailable);
            assert!(
                e.message
                    .contains("every instance is out of service: CUDA_ERROR_ILLEGAL_ADDRESS"),
                "{e:?}"
            );
        }
        assert!(!repo.all_ready());
        let index = repo.index(false).to_string();
        assert!(index.contains("\"state\":\"UNAVAILABLE\""), "{index}");
        assert!(metrics.render().contains(&gauge(2)));
    }

    #[tokio::test]
    async fn an_unchanged_reload_keeps_the_running_version() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "echo", ECHO);
        let repo = repository(dir.path());
        repo.load("echo").await.unwrap();
        let first = repo.get("echo", None).unwrap();
        repo.load("echo").await.unwrap();
        assert!(Arc::ptr_eq(&first, &repo.get("echo", None).unwrap()));
        write(
            dir.path(),
            "echo",
            &format!("{ECHO}\n[parameters]\nx = 1\n"),
        );
        repo.load("echo").await.unwrap();
        assert!(!Arc::ptr_eq(&first, &repo.get("echo", None).unwrap()));
    }

    #[tokio::test]
    async fn a_backend_no_factory_provides_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "enc", &ECHO.replace("\"wasm\"", "\"encoder\""));
        let repo = repository(dir.path());
        let e = repo.load("enc").await.unwrap_err();
        assert!(
            e.message.contains("backend 'encoder' is not available"),
            "{e:?}"
        );
        assert!(repo.get("enc", None).is_err());
    }

    /// The attack: reloading an ensemble so that a step names the ensemble
    /// itself answered 200, and one request then grew memory without bound.
    #[tokio::test]
    async fn an_ensemble_reloaded_to_call_itself_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "echo", ECHO);
        write(dir.path(), "pipe", &ensemble_of("echo"));
        let repo = repository(dir.path());
        repo.load("echo").await.unwrap();
        repo.load("pipe").await.unwrap();
        write(dir.path(), "pipe", &ensemble_of("pipe"));
        let e = repo.load("pipe").await.unwrap_err();
        assert!(
            e.message.contains("would call itself: pipe → pipe"),
            "{e:?}"
        );
        // The loaded version keeps serving.
        let model = repo.get("pipe", None).unwrap();
        assert_eq!(model.config.steps[0].model, "echo");
    }

    /// The same through another ensemble: A → B → A.
    #[tokio::test]
    async fn a_cycle_through_another_ensemble_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "echo", ECHO);
        write(dir.path(), "a", &ensemble_of("echo"));
        write(dir.path(), "b", &ensemble_of("a"));
        let repo = repository(dir.path());
        for name in ["echo", "a", "b"] {
            repo.load(name).await.unwrap();
        }
        write(dir.path(), "a", &ensemble_of("b"));
        let e = repo.load("a").await.unwrap_err();
        assert!(e.message.contains("a → b → a"), "{e:?}");
    }

    #[tokio::test]
    async fn ensemble_steps_must_name_loaded_models_and_known_tensors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "echo", ECHO);
        write(dir.path(), "missing", &ensemble_of("nowhere"));
        write(
            dir.path(),
            "wrong_tensor",
            &ensemble_of("echo").replace("X = \"X\" }\noutput", "Z = \"X\" }\noutput"),
        );
        let repo = repository(dir.path());
        repo.load("echo").await.unwrap();
        let e = repo.load("missing").await.unwrap_err();
        assert!(e.message.contains("step 0 (model 'nowhere')"), "{e:?}");
        let e = repo.load("wrong_tensor").await.unwrap_err();
        assert!(e.message.contains("'Z'"), "{e:?}");
    }

    /// `echo` and `other` echo X; `flag` echoes the BOOL tensor F.
    fn branching(root: &Path, steps: &str) -> Arc<Repository> {
        write(root, "echo", ECHO);
        write(root, "other", ECHO);
        write(
            root,
            "flag",
            "backend = \"wasm\"\nmax_batch_size = 0\n\
             [[input]]\nname = \"F\"\ndatatype = \"BOOL\"\ndims = [-1]\n\
             [[output]]\nname = \"F\"\ndatatype = \"BOOL\"\ndims = [-1]\n",
        );
        write(
            root,
            "branch",
            &format!(
                "backend = \"ensemble\"\nmax_batch_size = 0\n\
                 [[input]]\nname = \"X\"\ndatatype = \"INT32\"\ndims = [1]\n\
                 [[input]]\nname = \"F\"\ndatatype = \"BOOL\"\ndims = [-1]\n\
                 [[output]]\nname = \"Y\"\ndatatype = \"INT32\"\ndims = [1]\n\
                 [[step]]\nmodel = \"flag\"\ninput_map = {{ F = \"F\" }}\noutput_map = {{ F = \"COND\" }}\n{steps}"
            ),
        );
        repository(root)
    }

    const IF_ELSE: &str = "[[step]]\nmodel = \"echo\"\nrun_if = \"COND\"\n\
        input_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n\
        [[step]]\nmodel = \"other\"\nrun_unless = \"COND\"\n\
        input_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n";

    fn with_flag(value: i32, flags: &[bool]) -> BackendRequest {
        let mut request = x(value);
        request.inputs.push(wisp_core::tensor::Tensor {
            name: "F".into(),
            datatype: wisp_core::tensor::DataType::Bool,
            shape: vec![flags.len() as i64],
            data: flags.iter().map(|&f| f as u8).collect::<Vec<u8>>().into(),
        });
        request
    }

    #[tokio::test]
    async fn a_conditional_step_runs_only_on_its_side_of_the_condition() {
        let dir = tempfile::tempdir().unwrap();
        let repo = branching(dir.path(), IF_ELSE);
        for name in ["echo", "other", "flag", "branch"] {
            repo.load(name).await.unwrap();
        }
        let branch = repo.get("branch", None).unwrap();
        // Any true element takes the run_if side.
        for (value, flags) in [
            (1, vec![true]),
            (2, vec![false, false]),
            (3, vec![false, true]),
        ] {
            let reply = branch.infer(with_flag(value, &flags)).await.unwrap();
            assert_eq!(reply.outputs[0].name, "Y");
            assert_eq!(&reply.outputs[0].data[..], &value.to_le_bytes());
        }
        let metrics = repo.metrics.render();
        let count = |step: &str, outcome: &str, n: u32| {
            let line = format!("wisp_ensemble_step_total{{model=\"branch\",outcome=\"{outcome}\",step=\"{step}\",version=\"1\"}} {n}");
            assert!(metrics.contains(&line), "{line} in\n{metrics}");
        };
        count("0:flag", "ran", 3);
        count("1:echo", "ran", 2);
        count("1:echo", "skipped", 1);
        count("2:other", "ran", 1);
        count("2:other", "skipped", 2);
        // The skipped branch's model saw only the request it ran.
        assert!(metrics.contains("nv_inference_request_success{model=\"other\",version=\"1\"} 1\n"));
        assert!(metrics.contains("nv_inference_request_success{model=\"echo\",version=\"1\"} 2\n"));
    }

    #[tokio::test]
    async fn conditional_pipelines_are_checked_at_load() {
        let cases = [
            (
                // Only one branch writes the output.
                "[[step]]\nmodel = \"echo\"\nrun_if = \"COND\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n",
                "ensemble output 'Y' is produced only when 'COND' is true",
            ),
            (
                // A step that always runs reads a tensor one branch writes.
                "[[step]]\nmodel = \"echo\"\nrun_if = \"COND\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"T\" }\n\
                 [[step]]\nmodel = \"other\"\ninput_map = { X = \"T\" }\noutput_map = { X = \"Y\" }\n",
                "step 2 (model 'other') runs always but reads 'T', which is there only when 'COND' is true",
            ),
            (
                // Both sides of nothing: the same condition twice.
                "[[step]]\nmodel = \"echo\"\nrun_if = \"COND\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n\
                 [[step]]\nmodel = \"other\"\nrun_if = \"COND\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n",
                "tensor 'Y' is already produced by step 1",
            ),
            (
                "[[step]]\nmodel = \"echo\"\nrun_if = \"X\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n",
                "its condition 'X' from the ensemble's inputs is INT32, not BOOL",
            ),
            (
                "[[step]]\nmodel = \"echo\"\nrun_if = \"NOPE\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n",
                "its condition 'NOPE' is neither an ensemble input nor any step's output",
            ),
            (
                "[[step]]\nmodel = \"echo\"\nrun_if = \"COND\"\nrun_unless = \"COND\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"Y\" }\n",
                "run_if or run_unless, not both",
            ),
        ];
        for (steps, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let repo = branching(dir.path(), steps);
            for name in ["echo", "other", "flag"] {
                repo.load(name).await.unwrap();
            }
            let e = repo.load("branch").await.unwrap_err();
            assert!(e.message.contains(expected), "{expected}: {e:?}");
        }
    }

    #[tokio::test]
    async fn unloading_keeps_requests_in_flight_on_their_version() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "echo", ECHO);
        let repo = repository(dir.path());
        repo.load("echo").await.unwrap();
        let held = repo.get("echo", None).unwrap();
        repo.unload("echo").await.unwrap();
        assert!(repo.get("echo", None).is_err());
        let reply = held.infer(x(5)).await.unwrap();
        assert_eq!(&reply.outputs[0].data[..], &5i32.to_le_bytes());
    }

    /// Echoes once a permit is released: holds its batch until the test says so.
    struct Gate(Arc<tokio::sync::Semaphore>);

    impl Backend for Gate {
        fn execute(&self, requests: Vec<BackendRequest>) -> BoxFuture<'_, Execution> {
            Box::pin(async move {
                self.0.acquire().await.unwrap().forget();
                Echo.execute(requests).await
            })
        }
    }

    struct GateFactory(Arc<tokio::sync::Semaphore>);

    impl wisp_core::backend::BackendFactory for GateFactory {
        fn load(&self, _: &LoadContext<'_>) -> Result<Box<dyn Backend>> {
            Ok(Box::new(Gate(self.0.clone())))
        }
    }

    fn x(value: i32) -> BackendRequest {
        BackendRequest {
            inputs: vec![wisp_core::tensor::Tensor {
                name: "X".into(),
                datatype: wisp_core::tensor::DataType::Int32,
                shape: vec![1],
                data: value.to_le_bytes().to_vec().into(),
            }],
            ..Default::default()
        }
    }

    /// Under overload an ensemble used to run its first steps (tokenizing) for
    /// requests its last step then refused; now a full step refuses at the door.
    #[tokio::test]
    async fn an_ensemble_refuses_at_once_when_a_step_queue_is_full() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "echo", ECHO);
        write(
            dir.path(),
            "gate",
            &format!(
                "{}\n[dynamic_batching]\n[dynamic_batching.default_queue_policy]\nmax_queue_size = 1\n",
                ECHO.replace("\"wasm\"", "\"encoder\"")
            ),
        );
        write(
            dir.path(),
            "pipeline",
            "backend = \"ensemble\"\nmax_batch_size = 0\n\
             [[input]]\nname = \"X\"\ndatatype = \"INT32\"\ndims = [1]\n\
             [[output]]\nname = \"Y\"\ndatatype = \"INT32\"\ndims = [1]\n\
             [[step]]\nmodel = \"echo\"\ninput_map = { X = \"X\" }\noutput_map = { X = \"M\" }\n\
             [[step]]\nmodel = \"gate\"\ninput_map = { X = \"M\" }\noutput_map = { X = \"Y\" }\n",
        );
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let mut backends = BackendRegistry::new();
        backends.register("wasm", Arc::new(EchoFactory));
        // The gated model stands in for the encoder behind a tokenizer.
        backends.register("encoder", Arc::new(GateFactory(permits.clone())));
        let repo = Repository::new(
            dir.path().to_path_buf(),
            ControlMode::Explicit,
            backends,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        for name in ["echo", "gate", "pipeline"] {
            repo.load(name).await.unwrap();
        }
        let gate = repo.get("gate", None).unwrap();
        // One request runs (held by the gate), one waits: the queue of one is full.
        let (running, waiting) = (gate.clone(), gate.clone());
        let running = tokio::spawn(async move { running.infer(x(1)).await });
        tokio::task::yield_now().await;
        let waiting = tokio::spawn(async move { waiting.infer(x(2)).await });
        while !gate.is_full() {
            tokio::task::yield_now().await;
        }
        let echo_runs =
            || repo.get("echo", None).unwrap().stats.to_json("echo", 1)["inference_count"].clone();
        let before = echo_runs();
        let e = repo
            .get("pipeline", None)
            .unwrap()
            .infer(x(3))
            .await
            .unwrap_err();
        assert_eq!(e.kind, wisp_core::error::ErrorKind::Unavailable, "{e:?}");
        assert!(
            e.message.contains("model 'gate' is refusing requests"),
            "{e:?}"
        );
        assert_eq!(echo_runs(), before, "the first step must not run");

        permits.add_permits(3);
        assert!(running.await.unwrap().is_ok() && waiting.await.unwrap().is_ok());
        let reply = repo
            .get("pipeline", None)
            .unwrap()
            .infer(x(4))
            .await
            .unwrap();
        assert_eq!(&reply.outputs[0].data[..], &4i32.to_le_bytes());
    }
}
