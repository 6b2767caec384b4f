//! The `#[repr(C)]` types that cross the library boundary, and the fingerprint that guards them.
//!
//! Everything here is plain data: integers, `f32`, raw pointers and `extern "C"` function
//! pointers. Buffers are always allocated and freed by the host; the plugin only reads and writes
//! them for the duration of a call, so the two sides never share an allocator either.

/// Version of every type and function signature in this module except [`Fingerprint`]. Bump it on
/// any change to a `#[repr(C)]` type, a function signature, or the meaning of a field.
pub const API_VERSION: u32 = 1;

/// `b"tuneplug"`: tells a tune plugin's fingerprint from whatever another library returns.
pub const MAGIC: u64 = u64::from_le_bytes(*b"tuneplug");

/// Symbol of `extern "C" fn() -> Fingerprint`. The host calls it before anything else.
pub const FINGERPRINT_SYMBOL: &str = "tune_plugin_fingerprint";

/// Symbol of `extern "C" fn() -> *const PluginDescriptor`, called once the fingerprint matched.
pub const DESCRIPTOR_SYMBOL: &str = "tune_plugin_descriptor";

/// A call succeeded.
pub const STATUS_OK: i32 = 0;
/// A call returned an error; its message is in the [`ErrorBuf`].
pub const STATUS_ERROR: i32 = 1;
/// A call panicked; the export glue caught it and put the panic message in the [`ErrorBuf`].
pub const STATUS_PANIC: i32 = 2;

/// [`Site::Input`](crate::Site::Input) on the wire.
pub const SITE_INPUT: u32 = 1;
/// [`Site::Output`](crate::Site::Output) on the wire.
pub const SITE_OUTPUT: u32 = 2;

/// What the host checks before it reads anything else from a plugin: both sides must agree on
/// every field.
///
/// This struct is frozen: it is returned by value, so even appending a field would make an old
/// host and a new plugin disagree about its size. Every other change goes through
/// [`API_VERSION`] and the layout sizes below.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`API_VERSION`] of the `tune-plugin-api` the library was built against.
    pub api_version: u32,
    /// `size_of::<usize>()`: lengths and pointers cross the boundary.
    pub pointer_bytes: u32,
    /// 1 on little-endian targets: buffers are raw `f32` bytes.
    pub little_endian: u32,
    /// 1 if the library was built with `panic = "unwind"`. With `abort`, a panic inside it would
    /// kill `tune` instead of becoming an error, so the host refuses such a plugin.
    pub panic_unwind: u32,
    /// `size_of` each boundary struct: catches a layout change made without bumping the version.
    pub plugin_descriptor_bytes: u32,
    pub adapter_descriptor_bytes: u32,
    pub target_bytes: u32,
    pub param_bytes: u32,
    pub layer_bytes: u32,
}

impl Fingerprint {
    /// The fingerprint of the code being compiled. `panic_unwind` must be evaluated in the
    /// library's own crate (`cfg!(panic = "unwind")`), which [`export_plugin!`](crate::export_plugin)
    /// does.
    pub const fn of_this_build(panic_unwind: bool) -> Self {
        Fingerprint {
            magic: MAGIC,
            api_version: API_VERSION,
            pointer_bytes: std::mem::size_of::<usize>() as u32,
            little_endian: cfg!(target_endian = "little") as u32,
            panic_unwind: panic_unwind as u32,
            plugin_descriptor_bytes: std::mem::size_of::<PluginDescriptor>() as u32,
            adapter_descriptor_bytes: std::mem::size_of::<AdapterDescriptor>() as u32,
            target_bytes: std::mem::size_of::<Target>() as u32,
            param_bytes: std::mem::size_of::<Param>() as u32,
            layer_bytes: std::mem::size_of::<LayerAbi>() as u32,
        }
    }

    /// Every field by name, for messages that name what differs.
    pub fn fields(&self) -> [(&'static str, u64); 10] {
        [
            ("magic", self.magic),
            ("api_version", self.api_version as u64),
            ("pointer_bytes", self.pointer_bytes as u64),
            ("little_endian", self.little_endian as u64),
            ("panic_unwind", self.panic_unwind as u64),
            (
                "plugin_descriptor_bytes",
                self.plugin_descriptor_bytes as u64,
            ),
            (
                "adapter_descriptor_bytes",
                self.adapter_descriptor_bytes as u64,
            ),
            ("target_bytes", self.target_bytes as u64),
            ("param_bytes", self.param_bytes as u64),
            ("layer_bytes", self.layer_bytes as u64),
        ]
    }
}

/// A UTF-8 string the plugin owns for as long as it is loaded (in practice: a `&'static str`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Str {
    pub ptr: *const u8,
    pub len: usize,
}

impl Str {
    pub const fn new(s: &'static str) -> Self {
        Str {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// The string, or why it is not one.
    ///
    /// # Safety
    /// `ptr` must be null or point to `len` readable bytes that outlive `'a`.
    pub unsafe fn to_str<'a>(self) -> Result<&'a str, String> {
        if self.ptr.is_null() {
            return if self.len == 0 {
                Ok("")
            } else {
                Err("null string pointer".to_string())
            };
        }
        let bytes = std::slice::from_raw_parts(self.ptr, self.len);
        std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8: {e}"))
    }
}

/// A projection an adapter can adapt, by torchtune's module name, and the side it transforms.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub module: Str,
    /// [`SITE_INPUT`] or [`SITE_OUTPUT`].
    pub site: u32,
}

impl Target {
    /// Transform the input features of `module`: `y = g(x) W^T`.
    pub const fn input(module: &'static str) -> Self {
        Target {
            module: Str::new(module),
            site: SITE_INPUT,
        }
    }

    /// Transform the output features of `module`: `y = g(x W^T)`.
    pub const fn output(module: &'static str) -> Self {
        Target {
            module: Str::new(module),
            site: SITE_OUTPUT,
        }
    }
}

/// A trainable tensor of an adapted projection: `[features, width]` at an output site,
/// `[width, features]` at an input site, so its features axis lines up with the matching axis of
/// the base weight `[out, in]`. `name` is the tensor's name under the projection, as PEFT writes
/// it (IA3: `ia3_l`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: Str,
    pub width: usize,
}

impl Param {
    pub const fn new(name: &'static str, width: usize) -> Self {
        Param {
            name: Str::new(name),
            width,
        }
    }
}

/// A read-only `f32` buffer owned by the host.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct F32s {
    pub ptr: *const f32,
    pub len: usize,
}

impl F32s {
    pub fn from_slice(s: &[f32]) -> Self {
        F32s {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr` must point to `len` readable, aligned `f32`s that outlive `'a`.
    pub unsafe fn as_slice<'a>(self) -> &'a [f32] {
        if self.len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr, self.len)
    }
}

/// A writable `f32` buffer owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct F32sMut {
    pub ptr: *mut f32,
    pub len: usize,
}

impl F32sMut {
    pub fn from_slice(s: &mut [f32]) -> Self {
        F32sMut {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr` must point to `len` writable, aligned `f32`s that nothing else uses during `'a`.
    pub unsafe fn as_mut_slice<'a>(&self) -> &'a mut [f32] {
        if self.len == 0 {
            return &mut [];
        }
        std::slice::from_raw_parts_mut(self.ptr, self.len)
    }
}

/// Where a failing call writes its message (UTF-8, truncated to `cap` bytes). Owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct ErrorBuf {
    pub ptr: *mut u8,
    pub cap: usize,
    /// Bytes written.
    pub len: usize,
}

impl ErrorBuf {
    /// Copies as much of `message` as fits, cut at a character boundary.
    ///
    /// # Safety
    /// `ptr` must point to `cap` writable bytes.
    pub unsafe fn write(&mut self, message: &str) {
        let mut n = message.len().min(self.cap);
        while !message.is_char_boundary(n) {
            n -= 1;
        }
        if n > 0 {
            std::ptr::copy_nonoverlapping(message.as_ptr(), self.ptr, n);
        }
        self.len = n;
    }
}

/// One adapted projection, as a call sees it.
#[repr(C)]
#[derive(Debug)]
pub struct LayerAbi {
    /// [`SITE_INPUT`] or [`SITE_OUTPUT`].
    pub site: u32,
    /// Values per row of the transformed side: `in_features` at an input site, `out_features` at
    /// an output site.
    pub features: usize,
    /// Rows of activations in this call (0 for `merge`).
    pub rows: usize,
    /// The parameters, in the order of the adapter's [`Param`]s, row-major.
    pub params: *const F32s,
    pub num_params: usize,
}

/// Fills `out` (`features * width` values) with the initial value of parameter `param`.
pub type InitFn = unsafe extern "C" fn(
    site: u32,
    features: usize,
    param: usize,
    seed: u64,
    out: F32sMut,
    err: *mut ErrorBuf,
) -> i32;
/// `z = g(h)` for `h`, `z` of `rows * features` values.
pub type ForwardFn =
    unsafe extern "C" fn(layer: *const LayerAbi, h: F32s, z: F32sMut, err: *mut ErrorBuf) -> i32;
/// Given `dz = dL/dz`, writes `dh = dL/dh` and `dparams[i] = dL/dparam_i` (all zeroed on entry).
pub type BackwardFn = unsafe extern "C" fn(
    layer: *const LayerAbi,
    h: F32s,
    dz: F32s,
    dh: F32sMut,
    dparams: *const F32sMut,
    err: *mut ErrorBuf,
) -> i32;
/// Folds the adapter into the base weight `[out_features, in_features]` (row-major), in place.
pub type MergeFn = unsafe extern "C" fn(
    layer: *const LayerAbi,
    weight: F32sMut,
    out_features: usize,
    in_features: usize,
    err: *mut ErrorBuf,
) -> i32;

/// One adapter kind a plugin provides.
#[repr(C)]
#[derive(Debug)]
pub struct AdapterDescriptor {
    /// Registry name (`model.adapter: <name>`).
    pub name: Str,
    /// One line for `tune ls --adapters`.
    pub about: Str,
    pub targets: *const Target,
    pub num_targets: usize,
    pub params: *const Param,
    pub num_params: usize,
    /// A JSON object: the fixed fields of PEFT's `adapter_config.json`.
    pub peft_config: Str,
    /// The config key listing the adapted modules whose *input* is transformed (IA3:
    /// `feedforward_modules`); empty if the method has none.
    pub peft_input_modules_key: Str,
    // `Option` so that a null pointer from a hand-made descriptor is a value the host can
    // reject, not undefined behaviour (same layout as a nullable C function pointer).
    pub init: Option<InitFn>,
    pub forward: Option<ForwardFn>,
    pub backward: Option<BackwardFn>,
    pub merge: Option<MergeFn>,
}

/// What [`DESCRIPTOR_SYMBOL`] returns: the plugin and its adapters.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDescriptor {
    pub name: Str,
    pub version: Str,
    pub adapters: *const AdapterDescriptor,
    pub num_adapters: usize,
}

impl PluginDescriptor {
    pub const fn new(
        name: &'static str,
        version: &'static str,
        adapters: &'static [AdapterDescriptor],
    ) -> Self {
        PluginDescriptor {
            name: Str::new(name),
            version: Str::new(version),
            adapters: adapters.as_ptr(),
            num_adapters: adapters.len(),
        }
    }
}

// SAFETY: descriptors are built once from `'static` data and never written afterwards, so
// sharing them between threads is sharing immutable memory.
unsafe impl Sync for PluginDescriptor {}
unsafe impl Send for PluginDescriptor {}
unsafe impl Sync for AdapterDescriptor {}
unsafe impl Send for AdapterDescriptor {}
