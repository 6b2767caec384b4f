//! Adapter plugins: shared libraries built against `tune-plugin-api`, loaded at run time.
//!
//! [`load`] checks, in this order, and stops at the first problem with a message naming the
//! library: the file exists; it loads; it exports `tune_plugin_fingerprint`; that fingerprint
//! equals this build's (a mismatch names both values); it exports `tune_plugin_descriptor`; the
//! descriptor is well formed; none of its adapter names is taken. Only then are its adapters
//! registered, all of them, as components of kind `Adapter` whose origin is the library's path.
//! A loaded library is never unloaded: the registry and every layer built from it point into it.
//!
//! A plugin adapter layer ([`PluginLinear`]) keeps everything that is a tensor on the host: the
//! frozen weight, the trainable parameters (candle `Var`s the optimizer updates) and the matmul.
//! The plugin computes only the feature transform `g` on `f32` buffers copied from and to those
//! tensors; the host records `g` in its autograd graph as one custom op whose backward calls the
//! plugin's backward. No tensor crosses the boundary, so the plugin cannot mix a second copy of
//! candle (with its own tensor-id counter) into the host's gradients.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use tune_core::autograd::{frozen_linear, with_backward3};
use tune_core::registry::{self, Built, Component};
use tune_core::{
    Adapter, AdapterFactory, AdapterSpec, Args, ComponentKind, FrozenLinear, PeftTarget,
};
use tune_plugin_api::{
    AdapterDescriptor, BackwardFn, ErrorBuf, F32s, F32sMut, Fingerprint, ForwardFn, InitFn,
    LayerAbi, MergeFn, PluginDescriptor, Site, Str, DESCRIPTOR_SYMBOL, FINGERPRINT_SYMBOL, MAGIC,
    STATUS_ERROR, STATUS_OK, STATUS_PANIC,
};

/// The plugin API this build speaks (for messages and tests).
pub use tune_plugin_api as api;

/// The environment variable naming directories of plugins (colon-separated), each of whose
/// shared libraries is loaded.
pub const PLUGIN_PATH_ENV: &str = "TUNE_PLUGIN_PATH";

/// The projection names a plugin may target (torchtune's).
pub const MODULES: [&str; 8] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "output_proj",
    "w1",
    "w2",
    "w3",
    "output",
];

/// A loaded plugin library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPlugin {
    /// Canonical path of the library.
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    /// Names of the adapters it registered.
    pub adapters: Vec<String>,
}

#[derive(Default)]
struct Loaded {
    libraries: Vec<LoadedPlugin>,
    adapters: HashMap<String, Arc<PluginAdapter>>,
}

/// Everything loaded so far; the lock also makes loading one library at a time.
fn loaded() -> &'static Mutex<Loaded> {
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    LOADED.get_or_init(Mutex::default)
}

/// The plugins loaded in this process.
pub fn loaded_plugins() -> Vec<LoadedPlugin> {
    loaded().lock().expect("plugin lock").libraries.clone()
}

/// Loads the plugin library at `path` and registers its adapters. Loading the same file again
/// returns what the first load registered.
pub fn load(path: &Path) -> Result<LoadedPlugin> {
    if path.is_dir() {
        bail!(
            "plugin {} is a directory: name the library file itself (e.g. {}), or put the directory in {PLUGIN_PATH_ENV}",
            path.display(),
            path.join(library_file_name("tune_ia3")).display()
        );
    }
    if !path.is_file() {
        bail!("plugin {} not found", path.display());
    }
    let path = path
        .canonicalize()
        .with_context(|| format!("plugin {}", path.display()))?;
    let mut state = loaded().lock().expect("plugin lock");
    // The same library may be reached by two names (a hard link: cargo puts one in deps/).
    if let Some(done) = state
        .libraries
        .iter()
        .find(|p| p.path == path || same_file(&p.path, &path))
    {
        return Ok(done.clone());
    }
    let shown = path.display().to_string();
    // SAFETY: loading a library runs its initialisers. Nothing can check an arbitrary file for
    // that; naming a plugin means trusting it, as with any native code.
    let library = unsafe { libloading::Library::new(&path) }
        .with_context(|| format!("cannot load plugin {shown}"))?;

    // The fingerprint first: nothing else in the library is read until both sides agree on it.
    let fingerprint = unsafe { library.get::<extern "C" fn() -> Fingerprint>(FINGERPRINT_SYMBOL) }.map_err(|_| {
        anyhow!(
            "{shown} is not a tune adapter plugin: it has no `{FINGERPRINT_SYMBOL}` entry point (a plugin exports it \
             with tune_plugin_api::export_plugin!)"
        )
    })?;
    check_fingerprint(&fingerprint(), &Fingerprint::of_this_build(true))
        .map_err(|why| anyhow!("plugin {shown}: {why}"))?;

    let describe =
        unsafe { library.get::<extern "C" fn() -> *const PluginDescriptor>(DESCRIPTOR_SYMBOL) }
            .map_err(|_| anyhow!("plugin {shown} has no `{DESCRIPTOR_SYMBOL}` entry point"))?;
    // SAFETY: the fingerprint matched, so the descriptor has this build's layout; it points to
    // the library's static data, which stays mapped because the library is never unloaded.
    let descriptor = unsafe { describe().as_ref() }
        .ok_or_else(|| anyhow!("plugin {shown} returned no descriptor"))?;
    let (name, version, adapters) = unsafe { read_descriptor(descriptor, &path) }
        .map_err(|why| anyhow!("plugin {shown}: {why}"))?;

    // All names must be free before any is registered, so that a refused plugin leaves nothing.
    for (i, adapter) in adapters.iter().enumerate() {
        if adapters[..i].iter().any(|a| a.name == adapter.name) {
            bail!("plugin {shown} provides adapter `{}` twice", adapter.name);
        }
        if let Ok(existing) = registry::lookup(&adapter.name) {
            bail!(
                "plugin {shown} registers adapter `{}`, but that name is already registered (by {}); rename the plugin's adapter",
                adapter.name,
                existing.origin
            );
        }
    }
    let origin: &'static str = Box::leak(format!("plugin {shown}").into_boxed_str());
    for adapter in &adapters {
        let component = Component {
            path: Box::leak(adapter.name.clone().into_boxed_str()),
            aliases: &[],
            kind: ComponentKind::Adapter,
            args: &[],
            extra_args: false,
            about: Box::leak(adapter.about.clone().into_boxed_str()),
            origin,
            build: build_component,
        };
        registry::register_dynamic(component).with_context(|| format!("plugin {shown}"))?;
    }
    let plugin = LoadedPlugin {
        path,
        name,
        version,
        adapters: adapters.iter().map(|a| a.name.clone()).collect(),
    };
    for adapter in adapters {
        state
            .adapters
            .insert(adapter.name.clone(), Arc::new(adapter));
    }
    state.libraries.push(plugin.clone());
    // Never unloaded: registered components and built layers call into it for the whole run.
    std::mem::forget(library);
    Ok(plugin)
}

/// Loads every library in `paths`, in order.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<LoadedPlugin>> {
    paths.iter().map(|p| load(p)).collect()
}

/// The component build function of every plugin adapter: the factory registered under the name.
fn build_component(args: &Args) -> Result<Built> {
    let adapter = loaded()
        .lock()
        .expect("plugin lock")
        .adapters
        .get(args.component)
        .cloned();
    let adapter =
        adapter.ok_or_else(|| anyhow!("plugin adapter `{}` is not loaded", args.component))?;
    Ok(Box::new(
        Arc::new(PluginFactory(adapter)) as Arc<dyn AdapterFactory>
    ))
}

/// Whether two paths are one file (the same inode on Unix).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Ok(b)) = (a.metadata(), b.metadata()) {
            return a.dev() == b.dev() && a.ino() == b.ino();
        }
    }
    a == b
}

/// `lib{stem}.so` on Linux, `lib{stem}.dylib` on macOS, `{stem}.dll` on Windows.
pub fn library_file_name(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The plugin libraries in the directories of `TUNE_PLUGIN_PATH` (colon-separated; empty
/// entries are skipped), each directory's sorted by name.
pub fn env_plugin_paths() -> Result<Vec<PathBuf>> {
    match std::env::var_os(PLUGIN_PATH_ENV) {
        Some(dirs) => plugin_paths_in(&dirs),
        None => Ok(Vec::new()),
    }
}

/// The shared libraries in each directory of the path list `dirs`.
pub fn plugin_paths_in(dirs: &std::ffi::OsStr) -> Result<Vec<PathBuf>> {
    let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let mut out = Vec::new();
    for dir in std::env::split_paths(dirs).filter(|d| !d.as_os_str().is_empty()) {
        let entries = std::fs::read_dir(&dir).with_context(|| {
            format!(
                "{PLUGIN_PATH_ENV} names {}, which is not a readable directory",
                dir.display()
            )
        })?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                p.is_file() && name.starts_with(prefix) && name.ends_with(suffix)
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// The libraries a config's top-level `plugins:` key lists (a path or a list of paths; relative
/// paths are relative to the current directory, like every other path in a config).
pub fn config_plugin_paths(root: &serde_yaml::Value) -> Result<Vec<PathBuf>> {
    match root.get("plugins") {
        None | Some(serde_yaml::Value::Null) => Ok(Vec::new()),
        Some(serde_yaml::Value::String(p)) => Ok(vec![PathBuf::from(p)]),
        Some(serde_yaml::Value::Sequence(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(PathBuf::from).ok_or_else(|| {
                    anyhow!(
                        "`plugins` must list library paths, found {}",
                        tune_core::config::kind_of(v)
                    )
                })
            })
            .collect(),
        Some(other) => bail!(
            "`plugins` must be a list of library paths, found {}",
            tune_core::config::kind_of(other)
        ),
    }
}

/// Compares a plugin's fingerprint with the host's; the error names every field that differs.
pub fn check_fingerprint(
    plugin: &Fingerprint,
    host: &Fingerprint,
) -> std::result::Result<(), String> {
    if plugin.magic != MAGIC {
        return Err(format!(
            "`{FINGERPRINT_SYMBOL}` did not return a tune plugin fingerprint (magic {:#x}, expected {MAGIC:#x})",
            plugin.magic
        ));
    }
    let differences: Vec<String> = plugin
        .fields()
        .iter()
        .zip(host.fields())
        .filter(|(p, h)| p.1 != h.1)
        .map(|((name, p), (_, h))| format!("{name}: plugin {p}, tune {h}"))
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    let hint = if plugin.panic_unwind != host.panic_unwind {
        "build it with panic = \"unwind\" (the default): with \"abort\" a panic in it would kill tune"
    } else {
        "rebuild it against the tune-plugin-api of this tune"
    };
    Err(format!(
        "it was built for another plugin ABI ({}; tune speaks plugin API version {}): {hint}",
        differences.join(", "),
        host.api_version
    ))
}

/// # Safety
/// `ptr` must be null or point to `len` valid `T`s for `'a`.
unsafe fn slice<'a, T>(
    ptr: *const T,
    len: usize,
    what: &str,
) -> std::result::Result<&'a [T], String> {
    match (len, ptr.is_null()) {
        (0, _) => Ok(&[]),
        (_, true) => Err(format!("{what} is a null pointer with length {len}")),
        (_, false) => Ok(unsafe { std::slice::from_raw_parts(ptr, len) }),
    }
}

/// # Safety
/// As [`Str::to_str`].
unsafe fn string(s: Str, what: &str) -> std::result::Result<String, String> {
    unsafe { s.to_str() }
        .map(str::to_string)
        .map_err(|e| format!("{what}: {e}"))
}

/// The plugin's name, version and adapters, checked.
///
/// # Safety
/// `d` must have this build's layout (the fingerprint matched) and point to live data.
unsafe fn read_descriptor(
    d: &PluginDescriptor,
    library: &Path,
) -> std::result::Result<(String, String, Vec<PluginAdapter>), String> {
    let name = unsafe { string(d.name, "plugin name") }?;
    let version = unsafe { string(d.version, "plugin version") }?;
    let adapters = unsafe { slice(d.adapters, d.num_adapters, "adapter list") }?;
    if adapters.is_empty() {
        return Err("it provides no adapters".into());
    }
    let adapters = adapters
        .iter()
        .map(|a| unsafe { read_adapter(a, library) })
        .collect::<std::result::Result<_, _>>()?;
    Ok((name, version, adapters))
}

/// # Safety
/// As [`read_descriptor`].
unsafe fn read_adapter(
    a: &AdapterDescriptor,
    library: &Path,
) -> std::result::Result<PluginAdapter, String> {
    let name = unsafe { string(a.name, "adapter name") }?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(format!(
            "adapter name `{name}` must be non-empty letters, digits, `_`, `-` or `.`"
        ));
    }
    let fail = |why: String| format!("adapter `{name}`: {why}");
    let about = unsafe { string(a.about, "about") }.map_err(fail)?;
    let mut targets = Vec::new();
    for t in unsafe { slice(a.targets, a.num_targets, "target list") }.map_err(fail)? {
        let module = unsafe { string(t.module, "target module") }.map_err(fail)?;
        if !MODULES.contains(&module.as_str()) {
            return Err(fail(format!(
                "unknown target module `{module}`; torchtune's projection names are {MODULES:?}"
            )));
        }
        let site = Site::from_raw(t.site)
            .ok_or_else(|| fail(format!("target `{module}` has unknown site {}", t.site)))?;
        if targets.iter().any(|(m, _)| *m == module) {
            return Err(fail(format!("target `{module}` is listed twice")));
        }
        targets.push((module, site));
    }
    if targets.is_empty() {
        return Err(fail("it lists no target modules".into()));
    }
    let mut params: Vec<(String, usize)> = Vec::new();
    for p in unsafe { slice(a.params, a.num_params, "parameter list") }.map_err(fail)? {
        let pname = unsafe { string(p.name, "parameter name") }.map_err(fail)?;
        if pname.is_empty() || p.width == 0 || params.iter().any(|(n, _)| *n == pname) {
            return Err(fail(format!(
                "parameter `{pname}` (width {}) needs a unique name and a width of 1 or more",
                p.width
            )));
        }
        params.push((pname, p.width));
    }
    if params.is_empty() {
        return Err(fail("it declares no trainable parameters".into()));
    }
    let config_text = unsafe { string(a.peft_config, "PEFT config") }.map_err(fail)?;
    let peft_config = match serde_json::from_str(&config_text) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(fail(format!(
                "its PEFT config is not a JSON object: {config_text}"
            )))
        }
    };
    let input_key =
        unsafe { string(a.peft_input_modules_key, "PEFT input-modules key") }.map_err(fail)?;
    let missing = || fail("a null function pointer".into());
    Ok(PluginAdapter {
        about,
        library: library.to_path_buf(),
        targets,
        params,
        peft_config,
        peft_input_modules_key: (!input_key.is_empty()).then_some(input_key),
        init: a.init.ok_or_else(missing)?,
        forward: a.forward.ok_or_else(missing)?,
        backward: a.backward.ok_or_else(missing)?,
        merge: a.merge.ok_or_else(missing)?,
        name,
    })
}

/// One adapter a plugin provides, read from its descriptor.
pub struct PluginAdapter {
    pub name: String,
    pub about: String,
    /// The library it came from (for messages).
    pub library: PathBuf,
    /// torchtune module name -> site.
    pub targets: Vec<(String, Site)>,
    /// Parameter name -> width.
    pub params: Vec<(String, usize)>,
    pub peft_config: serde_json::Map<String, serde_json::Value>,
    pub peft_input_modules_key: Option<String>,
    init: InitFn,
    forward: ForwardFn,
    backward: BackwardFn,
    merge: MergeFn,
}

/// The f32 buffers of one call: the layer as the plugin sees it.
struct CallLayer<'a> {
    site: Site,
    features: usize,
    rows: usize,
    params: &'a [Vec<f32>],
}

impl CallLayer<'_> {
    /// Runs `f` with the C view of this layer (the views live as long as the call).
    fn with_abi<R>(&self, f: impl FnOnce(&LayerAbi) -> R) -> R {
        let views: Vec<F32s> = self.params.iter().map(|p| F32s::from_slice(p)).collect();
        let abi = LayerAbi {
            site: self.site.to_raw(),
            features: self.features,
            rows: self.rows,
            params: views.as_ptr(),
            num_params: views.len(),
        };
        f(&abi)
    }
}

impl PluginAdapter {
    /// The site at which this adapter transforms projection `slot`, if it adapts it.
    pub fn site(&self, slot: &str) -> Option<Site> {
        let module = slot.rsplit('.').next().unwrap_or(slot);
        self.targets
            .iter()
            .find(|(m, _)| m == module)
            .map(|(_, s)| *s)
    }

    /// Runs one plugin call with an error buffer; a failure names the adapter, library and call.
    fn call(&self, what: &str, f: impl FnOnce(*mut ErrorBuf) -> i32) -> candle_core::Result<()> {
        let mut message = vec![0u8; 4096];
        let mut err = ErrorBuf {
            ptr: message.as_mut_ptr(),
            cap: message.len(),
            len: 0,
        };
        let status = f(&mut err);
        if status == STATUS_OK {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&message[..err.len.min(message.len())]).into_owned();
        let how = match status {
            STATUS_ERROR => "failed".to_string(),
            STATUS_PANIC => "panicked".to_string(),
            other => format!("returned unknown status {other}"),
        };
        Err(candle_core::Error::Msg(format!(
            "plugin adapter `{}` ({}) {how} in {what}: {text}",
            self.name,
            self.library.display()
        )))
    }

    fn init_param(
        &self,
        site: Site,
        features: usize,
        param: usize,
        seed: u64,
    ) -> candle_core::Result<Vec<f32>> {
        let mut out = vec![0f32; features * self.params[param].1];
        let buf = F32sMut::from_slice(&mut out);
        // SAFETY: `buf` covers `out`, which outlives the call; the plugin checks the length.
        self.call("init", |err| unsafe {
            (self.init)(site.to_raw(), features, param, seed, buf, err)
        })?;
        Ok(out)
    }

    fn run_forward(&self, layer: &CallLayer, h: &[f32]) -> candle_core::Result<Vec<f32>> {
        let mut z = vec![0f32; h.len()];
        let zbuf = F32sMut::from_slice(&mut z);
        layer.with_abi(|abi| {
            // SAFETY: every buffer is a live host allocation of the stated length.
            self.call("forward", |err| unsafe {
                (self.forward)(abi, F32s::from_slice(h), zbuf, err)
            })
        })?;
        Ok(z)
    }

    /// `(dh, dparams)` for `dz`.
    fn run_backward(
        &self,
        layer: &CallLayer,
        h: &[f32],
        dz: &[f32],
    ) -> candle_core::Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut dh = vec![0f32; h.len()];
        let mut dparams: Vec<Vec<f32>> = layer.params.iter().map(|p| vec![0f32; p.len()]).collect();
        let dhbuf = F32sMut::from_slice(&mut dh);
        let views: Vec<F32sMut> = dparams.iter_mut().map(|g| F32sMut::from_slice(g)).collect();
        layer.with_abi(|abi| {
            // SAFETY: every buffer is a live host allocation of the stated length.
            self.call("backward", |err| unsafe {
                (self.backward)(
                    abi,
                    F32s::from_slice(h),
                    F32s::from_slice(dz),
                    dhbuf,
                    views.as_ptr(),
                    err,
                )
            })
        })?;
        Ok((dh, dparams))
    }

    fn run_merge(
        &self,
        layer: &CallLayer,
        weight: &mut [f32],
        out: usize,
        inp: usize,
    ) -> candle_core::Result<()> {
        let wbuf = F32sMut::from_slice(weight);
        layer.with_abi(|abi| {
            // SAFETY: `weight` holds out * in values and outlives the call.
            self.call("merge", |err| unsafe {
                (self.merge)(abi, wbuf, out, inp, err)
            })
        })
    }
}

/// The factory of a plugin adapter (what its registry component builds).
pub struct PluginFactory(pub Arc<PluginAdapter>);

impl AdapterFactory for PluginFactory {
    fn param_shapes(
        &self,
        _spec: &AdapterSpec,
        _in_dim: usize,
        _out_dim: usize,
    ) -> Vec<(String, Vec<usize>)> {
        // Without a projection name there is no site; callers use `param_shapes_for`.
        Vec::new()
    }

    fn build(
        &self,
        _spec: &AdapterSpec,
        _base_weight: Tensor,
        _seed: u64,
    ) -> candle_core::Result<Box<dyn Adapter>> {
        Err(candle_core::Error::Msg(format!(
            "plugin adapter `{}` adapts projections by name: build it with build_for",
            self.0.name
        )))
    }

    fn param_shapes_for(
        &self,
        slot: &str,
        _spec: &AdapterSpec,
        in_dim: usize,
        out_dim: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let Some(site) = self.0.site(slot) else {
            return Vec::new();
        };
        let features = features(site, in_dim, out_dim);
        self.0
            .params
            .iter()
            .map(|(name, width)| (name.clone(), param_shape(site, features, *width)))
            .collect()
    }

    fn build_for(
        &self,
        slot: &str,
        _spec: &AdapterSpec,
        base_weight: Tensor,
        seed: u64,
    ) -> candle_core::Result<Box<dyn Adapter>> {
        match self.0.site(slot) {
            Some(site) => Ok(Box::new(PluginLinear::new(
                self.0.clone(),
                site,
                base_weight,
                seed,
            )?)),
            // Selected by the config but not a target of this adapter (IA3 and the MLP's w1/w3).
            None => Ok(Box::new(FrozenLinear {
                weight: base_weight,
            })),
        }
    }

    fn peft_config(&self, _spec: &AdapterSpec, targets: &[PeftTarget]) -> serde_json::Value {
        let adapter = &self.0;
        let mut config = adapter.peft_config.clone();
        let names = |only_input: bool| -> Vec<serde_json::Value> {
            targets
                .iter()
                .filter(|t| !only_input || adapter.site(&t.module) == Some(Site::Input))
                .map(|t| serde_json::Value::String(t.hf_module.clone()))
                .collect()
        };
        config.insert("target_modules".into(), names(false).into());
        if let Some(key) = &adapter.peft_input_modules_key {
            config.insert(key.clone(), names(true).into());
        }
        serde_json::Value::Object(config)
    }

    fn rows_are_outputs(&self, slot: &str, leaf: &str) -> bool {
        self.0.site(slot) == Some(Site::Output)
            && self.0.params.iter().any(|(name, _)| name == leaf)
    }
}

/// Values per row of the transformed side of a `[out, in]` layer.
fn features(site: Site, in_dim: usize, out_dim: usize) -> usize {
    match site {
        Site::Input => in_dim,
        Site::Output => out_dim,
    }
}

/// A parameter's shape: `[features, width]` at an output site, `[width, features]` at an input
/// site, so its features axis lines up with the matching axis of the weight `[out, in]`.
fn param_shape(site: Site, features: usize, width: usize) -> Vec<usize> {
    match site {
        Site::Output => vec![features, width],
        Site::Input => vec![width, features],
    }
}

/// A tensor's values as host `f32`s, row-major.
fn to_host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.detach()
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1()
}

/// A frozen linear layer with a plugin's feature transform `g` on one side.
pub struct PluginLinear {
    adapter: Arc<PluginAdapter>,
    site: Site,
    /// The frozen base weight `[out, in]`.
    weight: Tensor,
    params: Vec<(String, Var)>,
}

impl PluginLinear {
    pub fn new(
        adapter: Arc<PluginAdapter>,
        site: Site,
        weight: Tensor,
        seed: u64,
    ) -> candle_core::Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let features = features(site, in_dim, out_dim);
        let mut params = Vec::new();
        for (i, (name, width)) in adapter.params.iter().enumerate() {
            let values = adapter.init_param(site, features, i, seed.wrapping_add(i as u64))?;
            let shape = param_shape(site, features, *width);
            let t = Tensor::from_vec(values, shape, weight.device())?.to_dtype(weight.dtype())?;
            params.push((name.clone(), Var::from_tensor(&t)?));
        }
        Ok(PluginLinear {
            adapter,
            site,
            weight,
            params,
        })
    }

    fn host_params(&self) -> candle_core::Result<Vec<Vec<f32>>> {
        self.params
            .iter()
            .map(|(_, v)| to_host(v.as_tensor()))
            .collect()
    }

    /// `g(h)` over the last dimension of `h`, recorded so that backward calls the plugin.
    fn transform(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let features = h.dim(candle_core::D::Minus1)?;
        let rows = h.elem_count() / features.max(1);
        let (shape, dtype, device) = (h.shape().clone(), h.dtype(), h.device().clone());
        let h_host = to_host(h)?;
        let params = self.host_params()?;
        let z = self.adapter.run_forward(
            &CallLayer {
                site: self.site,
                features,
                rows,
                params: &params,
            },
            &h_host,
        )?;
        let z = Tensor::from_vec(z, shape.clone(), &device)?.to_dtype(dtype)?;

        // The parameters enter the graph as one flat tensor (candle's custom ops take at most three
        // inputs); `cat` hands each Var its slice of the gradient.
        let flat = self
            .params
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let theta = Tensor::cat(&flat, 0)?;
        let theta_dtype = theta.dtype();
        let adapter = self.adapter.clone();
        let site = self.site;
        // with_backward3 is the two-input op needed here with `theta` passed again as the third
        // input, which gets no gradient.
        with_backward3("plugin_adapter", (h, &theta, &theta), z, move |dz| {
            let layer = CallLayer {
                site,
                features,
                rows,
                params: &params,
            };
            let (dh, dparams) = adapter.run_backward(&layer, &h_host, &to_host(dz)?)?;
            let dh = Tensor::from_vec(dh, shape.clone(), &device)?.to_dtype(dtype)?;
            let dparams = dparams.concat();
            let dtheta =
                Tensor::from_vec(dparams, theta_len(&params), &device)?.to_dtype(theta_dtype)?;
            Ok((Some(dh), Some(dtheta), None))
        })
    }
}

fn theta_len(params: &[Vec<f32>]) -> usize {
    params.iter().map(Vec::len).sum()
}

impl Adapter for PluginLinear {
    fn forward(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        match self.site {
            Site::Input => frozen_linear(&self.transform(x)?, &self.weight),
            Site::Output => self.transform(&frozen_linear(x, &self.weight)?),
        }
    }

    fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        frozen_linear(x, &self.weight)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let mut w = to_host(&self.weight)?;
        let params = self.host_params()?;
        let layer = CallLayer {
            site: self.site,
            features: features(self.site, in_dim, out_dim),
            rows: 0,
            params: &params,
        };
        self.adapter.run_merge(&layer, &mut w, out_dim, in_dim)?;
        Tensor::from_vec(w, (out_dim, in_dim), self.weight.device())?.to_dtype(self.weight.dtype())
    }

    fn base_weight(&self) -> candle_core::Result<Tensor> {
        Ok(self.weight.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_mismatches_name_both_sides() {
        let host = Fingerprint::of_this_build(true);
        assert_eq!(check_fingerprint(&host, &host), Ok(()));

        let newer = Fingerprint {
            api_version: host.api_version + 1,
            ..host
        };
        let why = check_fingerprint(&newer, &host).unwrap_err();
        let want = format!(
            "api_version: plugin {}, tune {}",
            host.api_version + 1,
            host.api_version
        );
        assert!(why.contains(&want), "{why}");

        let resized = Fingerprint {
            adapter_descriptor_bytes: host.adapter_descriptor_bytes + 8,
            ..host
        };
        assert!(check_fingerprint(&resized, &host)
            .unwrap_err()
            .contains("adapter_descriptor_bytes: plugin"));

        let aborting = Fingerprint {
            panic_unwind: 0,
            ..host
        };
        let why = check_fingerprint(&aborting, &host).unwrap_err();
        assert!(
            why.contains("panic_unwind: plugin 0, tune 1") && why.contains("panic = \"unwind\""),
            "{why}"
        );

        let garbage = Fingerprint { magic: 7, ..host };
        assert!(check_fingerprint(&garbage, &host)
            .unwrap_err()
            .contains("did not return a tune plugin fingerprint"));
    }

    #[test]
    fn plugin_paths_come_from_directories_and_config() {
        let dir = std::env::temp_dir().join(format!("tune-plugin-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            library_file_name("b"),
            library_file_name("a"),
            "notes.txt".to_string(),
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let list = std::env::join_paths([dir.as_path(), Path::new("")]).unwrap();
        let found = plugin_paths_in(&list).unwrap();
        assert_eq!(
            found,
            [
                dir.join(library_file_name("a")),
                dir.join(library_file_name("b"))
            ]
        );
        let missing = std::env::join_paths([dir.join("nope")]).unwrap();
        assert!(plugin_paths_in(&missing)
            .unwrap_err()
            .to_string()
            .contains("not a readable directory"));
        std::fs::remove_dir_all(&dir).unwrap();

        let config: serde_yaml::Value = serde_yaml::from_str("plugins: [a/libx.so, b.so]").unwrap();
        assert_eq!(
            config_plugin_paths(&config).unwrap(),
            [PathBuf::from("a/libx.so"), PathBuf::from("b.so")]
        );
        let config: serde_yaml::Value = serde_yaml::from_str("plugins: {x: 1}").unwrap();
        assert!(config_plugin_paths(&config).is_err());
        assert!(config_plugin_paths(&serde_yaml::Value::Null)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn missing_files_and_directories_are_clear_errors() {
        let why = load(Path::new("/nonexistent/libtune_nothing.so"))
            .unwrap_err()
            .to_string();
        assert_eq!(why, "plugin /nonexistent/libtune_nothing.so not found");
        let why = load(&std::env::temp_dir()).unwrap_err().to_string();
        assert!(why.contains("is a directory"), "{why}");
    }
}
