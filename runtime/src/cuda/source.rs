//! Kernel sources: rendered from the templates in `kernels/` (tera), named
//! by a hash of their text, compiled for a target (NVRTC for a GPU, the
//! system C++ compiler for the host device) and cached on disk by source
//! hash, target and compiler version.
//!
//! A kernel's parameters are declared once, here, and both its signature
//! and (on the host) its block entry `tsr_block_<name>` are generated from
//! that list, so the executor's argument packing and the kernel agree by
//! construction: the host device calls the block entry with the same
//! `void**` array cuLaunchKernel takes.

use super::device::{Binary, Target};
use super::libs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// One parameter of a kernel's signature: its C type and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub ty: String,
    pub name: String,
}

pub fn param(ty: &str, name: &str) -> Param {
    Param { ty: ty.to_string(), name: name.to_string() }
}

/// A rendered kernel: `text` defines `TSR_GLOBAL void <name>(<params>)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSource {
    pub name: String,
    pub params: Vec<Param>,
    pub text: String,
}

/// 128-bit FNV-1a (two 64-bit lanes): stable across Rust versions, unlike
/// the standard library's hasher.
pub fn hash128(parts: &[&[u8]]) -> u128 {
    let (mut a, mut b) = (0xcbf2_9ce4_8422_2325u64, 0x6c62_272e_07bb_0142u64);
    for p in parts {
        for &byte in *p {
            a = (a ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            b = (b ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
        a = a.wrapping_mul(0x0000_0100_0000_01b3) ^ 0xff;
    }
    ((a as u128) << 64) | b as u128
}

impl KernelSource {
    /// Renders `template` (tera) with `context`; the kernel is named
    /// `<family>_<hash of its text>`, so equal kernels share a name and a
    /// cache entry. The template writes `{{ name }}` and `{{ signature }}`.
    pub fn render(
        family: &str,
        template: &str,
        mut context: tera::Context,
        params: Vec<Param>,
    ) -> Result<Self, String> {
        let signature: Vec<String> = params.iter().map(|p| format!("{} {}", p.ty, p.name)).collect();
        context.insert("signature", &signature.join(", "));
        context.insert("name", "TSR_KERNEL_NAME");
        let text = tera::Tera::one_off(template, &context, false)
            .map_err(|e| format!("rendering the {family} kernel template: {}", tera_message(&e)))?;
        let h = hash128(&[text.as_bytes()]);
        let name = format!("{family}_{:016x}", (h >> 64) as u64 ^ h as u64);
        Ok(KernelSource { text: text.replace("TSR_KERNEL_NAME", &name), name, params })
    }

    /// The host device's entry for one block: sets the launch shim's
    /// indices (one thread per block) and calls the kernel with the
    /// arguments of a `void**` array.
    fn host_entry(&self) -> String {
        let args: Vec<String> = self.params.iter().enumerate().map(|(i, p)| format!("*({} *)a[{i}]", p.ty)).collect();
        format!(
            "extern \"C\" void tsr_block_{name}(const unsigned* b, const unsigned* g, void** a) {{\n    \
             blockIdx = {{b[0], b[1], b[2]}}; gridDim = {{g[0], g[1], g[2]}};\n    \
             blockDim = {{1, 1, 1}}; threadIdx = {{0, 0, 0}};\n    {name}({});\n}}\n",
            args.join(", "),
            name = self.name
        )
    }

    /// The race check's entry for a whole grid: `threads` real threads run
    /// every block in order, a barrier after each (shared memory is one
    /// static copy).
    fn host_threads_entry(&self) -> String {
        let args: Vec<String> = self.params.iter().enumerate().map(|(i, p)| format!("*({} *)a[{i}]", p.ty)).collect();
        format!(
            "#include <thread>\n#include <vector>\n\
             extern \"C\" void tsr_grid_{name}(const unsigned* g, void** a, unsigned threads) {{\n    \
             std::barrier<> bar(threads);\n    tsr_barrier = &bar;\n    std::vector<std::thread> team;\n    \
             for (unsigned t = 0; t < threads; ++t) {{\n        team.emplace_back([&, t] {{\n            \
             for (unsigned z = 0; z < g[2]; ++z) for (unsigned y = 0; y < g[1]; ++y) for (unsigned x = 0; x < g[0]; ++x) {{\n                \
             gridDim = {{g[0], g[1], g[2]}}; blockDim = {{threads, 1, 1}}; blockIdx = {{x, y, z}}; threadIdx = {{t, 0, 0}};\n                \
             {name}({});\n                bar.arrive_and_wait();\n            }}\n        }});\n    }}\n    \
             for (auto& th : team) {{ th.join(); }}\n}}\n",
            args.join(", "),
            name = self.name
        )
    }

    /// The whole translation unit for `target`.
    pub fn unit(&self, target: &Target) -> String {
        let mut s = String::with_capacity(PRELUDE.len() + self.text.len() + 1024);
        if *target == Target::HostThreads {
            s.push_str("#define TSR_HOST_THREADS 1\n");
        }
        s.push_str(PRELUDE);
        s.push('\n');
        s.push_str(&self.text);
        s.push('\n');
        match target {
            Target::Host => s.push_str(&self.host_entry()),
            Target::HostThreads => s.push_str(&self.host_threads_entry()),
            Target::Nvrtc { .. } => {}
        }
        s
    }
}

fn tera_message(e: &tera::Error) -> String {
    let mut m = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        m.push_str(": ");
        m.push_str(&s.to_string());
        src = s.source();
    }
    m
}

/// `${TESSERA_KERNEL_CACHE:-<cache>/kernels}`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("TESSERA_KERNEL_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => libs::cache_root().join("kernels"),
    }
}

/// The host compiler's version line (part of the cache key).
fn cxx_version() -> Result<String, String> {
    static V: OnceLock<Result<String, String>> = OnceLock::new();
    V.get_or_init(|| {
        let cxx = libs::cxx();
        let out = Command::new(&cxx)
            .arg("--version")
            .output()
            .map_err(|e| format!("the host device needs a C++ compiler (`{cxx}`, set TESSERA_CXX): {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string())
    })
    .clone()
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that
/// a concurrent reader never sees half a file.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().expect("cache paths have a parent");
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Compiles `k` for `target`, or reads it from the disk cache.
pub fn compile(k: &KernelSource, target: &Target) -> Result<Binary, String> {
    let unit = k.unit(target);
    let (key, ext) = match target {
        Target::Host => (format!("host {}", cxx_version()?), "so"),
        Target::HostThreads => (format!("host-threads {}", cxx_version()?), "so"),
        Target::Nvrtc { sm } => (format!("nvrtc {} sm_{sm}", super::nvrtc::version()?), "cubin"),
    };
    let h = hash128(&[unit.as_bytes(), key.as_bytes()]);
    let path = cache_dir().join(format!("{}-{h:032x}.{ext}", k.name));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(Binary { target: target.clone(), bytes, kernels: vec![k.name.clone()] });
    }
    let bytes = match target {
        Target::Host | Target::HostThreads => compile_host(&unit, &k.name)?,
        Target::Nvrtc { sm } => super::nvrtc::compile(&unit, &k.name, &format!("sm_{sm}"))?.cubin,
    };
    write_atomic(&path, &bytes)?;
    Ok(Binary { target: target.clone(), bytes, kernels: vec![k.name.clone()] })
}

/// g++ -O2 -shared: the kernel and its block entry as a shared library.
fn compile_host(unit: &str, name: &str) -> Result<Vec<u8>, String> {
    let include = libs::include_dir()?;
    // A directory of its own per compilation (threads may compile one kernel at once).
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tessera-cxx-{}-{n}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (src, out) = (dir.join("k.cpp"), dir.join("k.so"));
    std::fs::write(&src, unit).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
    let cxx = libs::cxx();
    let result = Command::new(&cxx)
        .args(["-O2", "-std=c++20", "-pthread", "-shared", "-fPIC", "-w", "-fno-fast-math", "-ffp-contract=off"])
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("cannot run the host C++ compiler `{cxx}`: {e}"));
    let bytes = result.and_then(|r| {
        if r.status.success() {
            std::fs::read(&out).map_err(|e| format!("cannot read {}: {e}", out.display()))
        } else {
            Err(format!(
                "the host C++ compiler failed on kernel {name}:\n{}",
                String::from_utf8_lossy(&r.stderr).lines().take(40).collect::<Vec<_>>().join("\n")
            ))
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}
