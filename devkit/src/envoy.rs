//! A real Envoy with Tollgate in its filter chain: the bootstrap, the process, its admin API.
//! Listeners and the admin bind port 0; the ports are read back from the admin API.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The `envoy` binary: `$ENVOY_BIN`, else the project's virtualenv, else `envoy` on `PATH`.
pub fn envoy_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(bin);
    }
    let venv = workspace_root().join(".venv/bin/envoy");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("envoy")
}

/// The repository root (this crate lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The release build of the filter.
pub fn filter_wasm_path() -> PathBuf {
    if let Some(path) = std::env::var_os("TOLLGATE_WASM") {
        return PathBuf::from(path);
    }
    workspace_root().join("target/wasm32-wasip1/release/tollgate_filter.wasm")
}

/// The native module (`make native`): `$TOLLGATE_NATIVE`, else the `native` profile's build.
pub fn native_module_path() -> PathBuf {
    if let Some(path) = std::env::var_os("TOLLGATE_NATIVE") {
        return PathBuf::from(path);
    }
    workspace_root().join("target/native/libtollgate.so")
}

/// The native module, or an error telling how to build it.
pub fn require_native_module() -> Result<PathBuf> {
    let path = native_module_path();
    if !path.is_file() {
        bail!(
            "the native module {} is missing: run `make native`",
            path.display()
        );
    }
    Ok(path)
}

/// Which of Tollgate's two Envoy adapters runs the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapter {
    /// The proxy-wasm filter (`make wasm`), in V8.
    Wasm,
    /// The dynamic module (`make native`), `libtollgate.so`.
    Native,
}

impl Adapter {
    pub const ALL: [Adapter; 2] = [Adapter::Wasm, Adapter::Native];

    /// The namespace of the filter's own stats: `<prefix>.tollgate.*`.
    pub fn stat_prefix(self) -> &'static str {
        match self {
            Adapter::Wasm => "wasmcustom",
            Adapter::Native => "dynamicmodulescustom",
        }
    }

    /// A stat of the filter by its name under `tollgate.`, e.g. `requests_allowed`.
    pub fn stat(self, name: &str) -> String {
        format!("{}.tollgate.{name}", self.stat_prefix())
    }

    pub fn name(self) -> &'static str {
        match self {
            Adapter::Wasm => "wasm",
            Adapter::Native => "native",
        }
    }

    /// The filter's `typed_config` type, for ECDS.
    pub fn type_url(self) -> &'static str {
        match self {
            Adapter::Wasm => "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            Adapter::Native => "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        }
    }
}

/// An Envoy dynamic-module HTTP filter entry running `libtollgate.so` (found through
/// `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`, which [`Envoy`] sets) with the plugin `configuration`.
pub fn native_http_filter(configuration: &str) -> Value {
    native_http_filter_of(NATIVE_MODULE_NAME, configuration)
}

/// The dynamic module's name: Envoy loads `lib<name>.so`.
pub const NATIVE_MODULE_NAME: &str = "tollgate";

/// [`native_http_filter`] loading the module `lib<module>.so` (a missing one, in the tests
/// that show the filter fails closed).
pub fn native_http_filter_of(module: &str, configuration: &str) -> Value {
    json!({
        "name": "tollgate",
        "typed_config": {
            "@type": Adapter::Native.type_url(),
            // Kept loaded: unloading a module with thread-locals or a live gate is not safe.
            "dynamic_module_config": {"name": module, "do_not_close": true},
            "filter_name": "tollgate",
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": configuration,
            },
        }
    })
}

/// The folder of an Envoy's scratch directory holding a module of its own.
const MODULES_DIR: &str = "modules";

/// Where Envoy looks for dynamic modules: the native module's folder.
fn module_search_path() -> PathBuf {
    native_module_path()
        .parent()
        .map_or_else(workspace_root, Path::to_path_buf)
}

/// An Envoy wasm HTTP filter entry (named `tollgate`, V8) loading `module` with the plugin
/// `configuration`.
pub fn wasm_http_filter(module: &Path, configuration: &str) -> Value {
    json!({
        "name": "tollgate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "tollgate",
                "root_id": "tollgate",
                "vm_config": {
                    "vm_id": "tollgate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": module.to_string_lossy()}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                // If the VM cannot be created or crashes, refuse traffic: unlicensed use
                // must not pass silently.
                "failure_policy": "FAIL_CLOSED",
            }
        }
    })
}

/// What goes into a generated bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// Tollgate's plugin configuration; `None` builds Envoy without the filter.
    pub plugin_config: Option<Value>,
    /// The wasm filter (default) or the native module.
    pub adapter: Adapter,
    pub wasm_path: PathBuf,
    pub upstream_port: u16,
    /// Listener port; 0 picks a free one.
    pub listen_port: u16,
    /// Admin port; 0 picks a free one.
    pub admin_port: u16,
    /// Spread connections evenly over the workers (tests that need every worker busy).
    pub exact_balance: bool,
    /// Ports of collector replicas on 127.0.0.1, the endpoints of the cluster
    /// `tollgate_collector` (none: no such cluster). With more than one, the cluster health
    /// checks `/readyz` and sends batches only to replicas that answer.
    pub collector_ports: Vec<u16>,
    /// Deliver the plugin configuration by ECDS from a file Envoy watches in this directory
    /// (see [`Bootstrap::write_plugin_config`]) instead of inline: changing it builds new VMs
    /// in the running Envoy, as a control plane or Istio does.
    pub ecds_dir: Option<PathBuf>,
    /// The native module's name (`lib<name>.so`); [`NATIVE_MODULE_NAME`] unless a test wants
    /// a module that is not there.
    pub native_module: String,
}

/// The name of the ECDS file in [`Bootstrap::ecds_dir`].
pub const ECDS_FILE: &str = "tollgate.ecds.json";

impl Bootstrap {
    pub fn new(plugin_config: Value, upstream_port: u16) -> Self {
        Bootstrap {
            plugin_config: Some(plugin_config),
            adapter: Adapter::Wasm,
            wasm_path: filter_wasm_path(),
            upstream_port,
            listen_port: 0,
            admin_port: 0,
            exact_balance: false,
            collector_ports: Vec::new(),
            ecds_dir: None,
            native_module: NATIVE_MODULE_NAME.to_string(),
        }
    }

    /// The Tollgate filter as an ECDS resource (a `TypedExtensionConfig`).
    pub fn ecds_resource(&self, plugin_config: &Value) -> Value {
        let filter = self.tollgate_filter(plugin_config);
        json!({
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": filter["name"],
            "typed_config": filter["typed_config"],
        })
    }

    /// Write (or replace) the plugin configuration served by ECDS from [`Bootstrap::ecds_dir`].
    /// The file is replaced by a rename, which is what Envoy's directory watch reacts to; a
    /// running Envoy then builds VMs with the new configuration.
    pub fn write_plugin_config(&self, plugin_config: &Value) -> Result<()> {
        let dir = self
            .ecds_dir
            .as_ref()
            .context("write_plugin_config needs ecds_dir")?;
        std::fs::create_dir_all(dir)?;
        let response = json!({
            "version_info": format!("{:016x}", fnv1a(plugin_config.to_string().as_bytes())),
            "resources": [self.ecds_resource(plugin_config)],
        });
        let staging = dir.join(".staging.json");
        std::fs::write(&staging, serde_json::to_vec_pretty(&response)?)?;
        std::fs::rename(&staging, dir.join(ECDS_FILE))?;
        Ok(())
    }

    /// The Tollgate HTTP filter entry for an HTTP connection manager.
    pub fn tollgate_filter(&self, plugin_config: &Value) -> Value {
        match self.adapter {
            Adapter::Wasm => wasm_http_filter(&self.wasm_path, &plugin_config.to_string()),
            Adapter::Native => {
                native_http_filter_of(&self.native_module, &plugin_config.to_string())
            }
        }
    }

    /// The bootstrap as JSON (Envoy reads JSON as YAML).
    pub fn to_json(&self) -> Value {
        let mut http_filters = Vec::new();
        if let Some(dir) = &self.ecds_dir {
            let file = dir.join(ECDS_FILE);
            http_filters.push(json!({
                "name": "tollgate",
                "config_discovery": {
                    "config_source": {
                        "path_config_source": {
                            "path": file.to_string_lossy(),
                            "watched_directory": {"path": dir.to_string_lossy()},
                        },
                        "resource_api_version": "V3",
                    },
                    "type_urls": [self.adapter.type_url()],
                }
            }));
        } else if let Some(config) = &self.plugin_config {
            http_filters.push(self.tollgate_filter(config));
        }
        http_filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }));
        let mut bootstrap = json!({
            // xDS (here ECDS from a file) needs a node identity.
            "node": {"id": "tollgate-devkit", "cluster": "tollgate"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "stats_config": stats_config(),
            "static_resources": {
                "listeners": [{
                    "name": "api",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.listen_port}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "api",
                            // Routes are matched on the normalised path: `/v1/../admin` and
                            // `//v1` cannot dodge a route's feature.
                            "normalize_path": true,
                            "merge_slashes": true,
                            "path_with_escaped_slashes_action": "REJECT_REQUEST",
                            "route_config": {"virtual_hosts": [{
                                "name": "api",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]
                            }]},
                            "http_filters": http_filters,
                        }
                    }]}]
                }],
                "clusters": [static_cluster("upstream", self.upstream_port)]
            }
        });
        if !self.collector_ports.is_empty() {
            if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
                clusters.push(collector_cluster(&self.collector_ports));
            }
        }
        if self.exact_balance {
            bootstrap["static_resources"]["listeners"][0]["connection_balance_config"] =
                json!({"exact_balance": {}});
        }
        bootstrap
    }
}

/// A cluster of one endpoint on 127.0.0.1.
fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
        }]}]}
    })
}

/// The collector cluster: every replica an endpoint. With several, each is health-checked on
/// `/readyz` every second, so batches stop going to a replica soon after it dies (a batch sent
/// to it in the meantime fails and is retried, possibly on another replica, under the same id).
fn collector_cluster(ports: &[u16]) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|port| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}))
        .collect();
    let mut cluster = json!({
        "name": "tollgate_collector",
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {"cluster_name": "tollgate_collector", "endpoints": [{"lb_endpoints": endpoints}]}
    });
    if ports.len() > 1 {
        cluster["health_checks"] = json!([{
            "timeout": "1s",
            "interval": "1s",
            // As in envoy/envoy.yaml: checked every second from the start, not every 60 s
            // while no batch has been sent yet.
            "no_traffic_interval": "1s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "http_health_check": {"path": "/readyz"},
        }]);
    }
    cluster
}

/// FNV-1a, for a version string that changes with the content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Tag extraction so Prometheus sees `reason` and `feature` labels on Tollgate's stats.
pub fn stats_config() -> Value {
    json!({"stats_tags": [
        {"tag_name": "tollgate_reason", "regex": "^wasmcustom\\.tollgate\\.requests_refused(\\.reason\\.(\\w+))$"},
        {"tag_name": "tollgate_feature", "regex": "^wasmcustom\\.tollgate\\.feature(\\.([\\w-]+))\\.\\w+$"},
        {"tag_name": "tollgate_reason", "regex": "^dynamicmodulescustom\\.tollgate\\.requests_refused(\\.reason\\.(\\w+))$"},
        {"tag_name": "tollgate_feature", "regex": "^dynamicmodulescustom\\.tollgate\\.feature(\\.([\\w-]+))\\.\\w+$"}
    ]})
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    pub admin: SocketAddr,
    pub listener: SocketAddr,
    agent: ureq::Agent,
    /// Hot restart: the shared-memory base id and this process's epoch (`None`: disabled).
    hot: Option<(u32, u32)>,
    concurrency: u32,
}

fn scratch_dir(name: &str) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `envoy --mode validate` on a configuration file; the error carries Envoy's output.
pub fn validate(config: &Path) -> Result<()> {
    let output = Command::new(envoy_binary())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "error",
            "-c",
        ])
        .arg(config)
        .current_dir(workspace_root())
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", module_search_path())
        .output()
        .with_context(|| format!("running {}", envoy_binary().display()))?;
    if !output.status.success() {
        bail!(
            "{} does not validate:\n{}{}",
            config.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl Envoy {
    /// Start Envoy with `bootstrap` and `concurrency` worker threads; returns once it is ready.
    pub fn start(name: &str, bootstrap: &Value, concurrency: u32) -> Result<Envoy> {
        let dir = scratch_dir(name)?;
        let config_path = dir.join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(bootstrap)?)?;
        Envoy::start_file(&dir, &config_path, concurrency)
    }

    /// Start Envoy with `bootstrap` whose native module is `module` (another build of
    /// `libtollgate.so`, e.g. `make native-probe`'s) instead of [`native_module_path`].
    pub fn start_with_module(
        name: &str,
        bootstrap: &Value,
        concurrency: u32,
        module: &Path,
    ) -> Result<Envoy> {
        let dir = scratch_dir(name)?;
        let modules = dir.join(MODULES_DIR);
        std::fs::create_dir_all(&modules)?;
        std::fs::copy(module, modules.join("libtollgate.so"))
            .with_context(|| format!("copying {}", module.display()))?;
        let config_path = dir.join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(bootstrap)?)?;
        Envoy::start_file(&dir, &config_path, concurrency)
    }

    /// Start Envoy from a configuration file; `dir` receives its log and admin address.
    pub fn start_file(dir: &Path, config_path: &Path, concurrency: u32) -> Result<Envoy> {
        Envoy::spawn(dir, config_path, concurrency, None)
    }

    /// Start Envoy able to hot restart (epoch 0, a base id of its own): see
    /// [`Envoy::hot_restart`]. Its listener port must be fixed in `bootstrap`, since the next
    /// epoch takes over the listening socket by address.
    pub fn start_hot_restartable(name: &str, bootstrap: &Value, concurrency: u32) -> Result<Envoy> {
        let dir = scratch_dir(name)?;
        let config_path = dir.join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(bootstrap)?)?;
        // A base id per test process and Envoy: Envoys on one machine must not share one.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let base_id = 10_000
            + (std::process::id() % 50_000) * 8
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8;
        Envoy::spawn(&dir, &config_path, concurrency, Some((base_id, 0)))
    }

    /// Hot restart (`--restart-epoch` + 1, same base id) with `bootstrap`: the new process
    /// takes over the listener, this one drains for `drain` and then exits (Envoy's
    /// `--parent-shutdown-time-s`, 1 s later). Returns the new process once it is ready; wait
    /// for this one with [`Envoy::wait_exit`].
    pub fn hot_restart(&self, bootstrap: &Value, drain: Duration) -> Result<Envoy> {
        let Some((base_id, epoch)) = self.hot else {
            bail!("this Envoy was started with hot restart disabled");
        };
        let dir = scratch_dir(&format!("epoch-{}", epoch + 1))?;
        let config_path = dir.join("envoy.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(bootstrap)?)?;
        Envoy::spawn_with(
            &dir,
            &config_path,
            self.concurrency,
            Some((base_id, epoch + 1)),
            drain,
        )
    }

    /// Wait until the process exits (a parent after a hot restart), at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("envoy did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(
        dir: &Path,
        config_path: &Path,
        concurrency: u32,
        hot: Option<(u32, u32)>,
    ) -> Result<Envoy> {
        Envoy::spawn_with(dir, config_path, concurrency, hot, Duration::from_secs(2))
    }

    fn spawn_with(
        dir: &Path,
        config_path: &Path,
        concurrency: u32,
        hot: Option<(u32, u32)>,
        drain: Duration,
    ) -> Result<Envoy> {
        let admin_path = dir.join("admin.address");
        let log_path = dir.join("envoy.log");
        let _ = std::fs::remove_file(&admin_path);
        // A module of this Envoy's own (see `start_with_module`), else the built one.
        let modules = dir.join(MODULES_DIR);
        let search_path = if modules.is_dir() {
            modules
        } else {
            module_search_path()
        };
        let mut command = Command::new(envoy_binary());
        command
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", search_path)
            .arg("-c")
            .arg(config_path)
            .args(["--concurrency", &concurrency.to_string()]);
        match hot {
            Some((base_id, epoch)) => {
                let drain_s = drain.as_secs().max(1);
                command
                    .args(["--base-id", &base_id.to_string()])
                    .args(["--restart-epoch", &epoch.to_string()])
                    .args(["--drain-time-s", &drain_s.to_string()])
                    .args(["--parent-shutdown-time-s", &(drain_s + 1).to_string()]);
            }
            // Many Envoys run side by side in tests: no shared memory, so no base-id clashes.
            // `--drain-time-s` also paces `POST /drain_listeners?graceful` (600 s by default).
            None => {
                command
                    .arg("--disable-hot-restart")
                    .args(["--drain-time-s", &drain.as_secs().max(1).to_string()]);
            }
        }
        let child = command
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log_path)
            .args(["-l", "info"])
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run `make envoy` to install it)",
                    envoy_binary().display()
                )
            })?;
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let mut envoy = Envoy {
            child,
            dir: dir.to_path_buf(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listener: SocketAddr::from(([127, 0, 0, 1], 0)),
            agent,
            hot,
            concurrency,
        };
        envoy.wait_ready(Duration::from_secs(60))?;
        Ok(envoy)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let admin_path = self.dir.join("admin.address");
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "envoy exited ({status}) while starting; log:\n{}",
                    self.log_tail(60)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy was not ready within {limit:?}; log:\n{}",
                    self.log_tail(60)
                );
            }
            if self.admin.port() == 0 {
                if let Ok(text) = std::fs::read_to_string(&admin_path) {
                    if let Ok(addr) = text.trim().parse() {
                        self.admin = addr;
                    }
                }
            }
            if self.admin.port() != 0 {
                if let Ok(body) = self.admin_get("/ready") {
                    if body.trim() == "LIVE" {
                        self.listener = self.read_listener()?;
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_listener(&self) -> Result<SocketAddr> {
        let listeners: Value = serde_json::from_str(&self.admin_get("/listeners?format=json")?)?;
        let port = listeners["listener_statuses"][0]["local_address"]["socket_address"]
            ["port_value"]
            .as_u64()
            .context("no listener port in /listeners")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], u16::try_from(port)?)))
    }

    /// `http://127.0.0.1:<listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listener, path)
    }

    /// GET on the admin API.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let response = self
            .agent
            .get(&format!("http://{}{}", self.admin, path))
            .call()?;
        Ok(response.into_string()?)
    }

    /// POST on the admin API.
    pub fn admin_post(&self, path: &str) -> Result<String> {
        let response = self
            .agent
            .post(&format!("http://{}{}", self.admin, path))
            .call()?;
        Ok(response.into_string()?)
    }

    /// Every counter and gauge, by name.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let text = self.admin_get("/stats?usedonly")?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// One stat's value (0 if it does not exist yet).
    pub fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats()?.get(name).copied().unwrap_or(0))
    }

    /// The whole Envoy log.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.dir.join("envoy.log")) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let skip = all.len().saturating_sub(lines);
        all.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
    }

    /// The process id (for its memory in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The directory with this Envoy's config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("TOLLGATE_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
