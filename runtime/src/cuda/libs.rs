//! Finding what the CUDA backend needs on this machine: the driver library
//! (libcuda), NVRTC (with its builtins), cuBLASLt, the CUDA headers
//! (cuda_bf16.h), and for the host device a C++ compiler. cudarc loads
//! libraries by name; we find them by path first (CUDA_HOME, /usr/local/cuda*,
//! the Python environment's `nvidia/*/lib`, the tools of
//! scripts/setup-cuda-tools.sh) and load them, so that cudarc's load by
//! name finds the copy already in the process (glibc matches the soname),
//! and a missing library is an error that names it and where we looked.
//!
//! Invariant: never a link stub (`.../lib/stubs`): loading one makes the
//! process die without a message.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `${TESSERA_CACHE:-~/.cache/tessera}`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("TESSERA_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".cache/tessera"),
            None => std::env::temp_dir().join("tessera-cache"),
        },
    }
}

/// Where scripts/setup-cuda-tools.sh puts the PyPI CUDA wheels.
pub fn tools_root() -> PathBuf {
    cache_root().join("cuda-tools-13.0/site/nvidia/cu13")
}

/// Directories that may hold CUDA libraries, most specific first.
fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("TESSERA_CUDA_LIB_DIRS") {
        dirs.extend(std::env::split_paths(&v));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            let h = PathBuf::from(h);
            dirs.push(h.join("targets/x86_64-linux/lib"));
            dirs.push(h.join("lib64"));
            dirs.push(h.join("lib"));
        }
    }
    if let Some(v) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&v));
    }
    for base in ["/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-13"] {
        dirs.push(PathBuf::from(base).join("targets/x86_64-linux/lib"));
        dirs.push(PathBuf::from(base).join("lib64"));
    }
    dirs.push(tools_root().join("lib"));
    dirs.extend(python_nvidia_dirs("lib"));
    dirs.extend(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"].map(PathBuf::from));
    dirs.retain(|d| !d.components().any(|c| c.as_os_str() == "stubs"));
    dirs
}

/// `site-packages/nvidia/*/<sub>` of the Python environments we can see
/// (PyTorch's CUDA wheels keep cuDNN and NCCL there).
fn python_nvidia_dirs(sub: &str) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for base in ["/usr/local/lib", "/usr/lib", "/opt/conda/lib"] {
        if let Ok(entries) = std::fs::read_dir(base) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("python3") {
                    roots.push(e.path().join("site-packages/nvidia"));
                    roots.push(e.path().join("dist-packages/nvidia"));
                }
            }
        }
    }
    let mut out = Vec::new();
    for r in roots {
        if let Ok(entries) = std::fs::read_dir(&r) {
            for e in entries.flatten() {
                out.push(e.path().join(sub));
            }
        }
    }
    out
}

/// The first file called one of `names` in the library directories.
pub fn find_lib(names: &[&str]) -> Option<PathBuf> {
    for d in lib_dirs() {
        for n in names {
            let p = d.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Loads a library by path and keeps it loaded for the process.
fn preload(path: &Path) -> Result<(), String> {
    static LOADED: OnceLock<std::sync::Mutex<Vec<libloading::Library>>> = OnceLock::new();
    // SAFETY: loading a CUDA library runs its initialisers, which expect
    // nothing of us; the handle is kept for the process's lifetime.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| format!("cannot load {}: {e}", path.display()))?;
    LOADED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner()).push(lib);
    Ok(())
}

/// One library the backend needs: its file names (sonames first) and what
/// to tell a user who lacks it.
struct Needed {
    what: &'static str,
    names: &'static [&'static str],
}

const DRIVER: Needed = Needed { what: "the NVIDIA driver (libcuda.so.1)", names: &["libcuda.so.1", "libcuda.so"] };
const NVRTC: Needed = Needed { what: "NVRTC 13 (libnvrtc.so.13)", names: &["libnvrtc.so.13"] };
const NVRTC_BUILTINS: Needed =
    Needed { what: "NVRTC's builtins (libnvrtc-builtins.so.13.0)", names: &["libnvrtc-builtins.so.13.0"] };
const CUBLASLT: Needed = Needed { what: "cuBLASLt 13 (libcublasLt.so.13)", names: &["libcublasLt.so.13"] };

fn load_needed(n: &Needed) -> Result<PathBuf, String> {
    let path = find_lib(n.names).ok_or_else(|| {
        format!(
            "{} was not found (looked for {} in TESSERA_CUDA_LIB_DIRS, CUDA_HOME, LD_LIBRARY_PATH, /usr/local/cuda*, the Python environment's nvidia/*/lib and {})",
            n.what,
            n.names.join(" or "),
            tools_root().join("lib").display()
        )
    })?;
    preload(&path)?;
    Ok(path)
}

/// NVRTC and its builtins, loaded once (for compiling kernels; no GPU needed).
pub fn load_nvrtc() -> Result<(), String> {
    static R: OnceLock<Result<(), String>> = OnceLock::new();
    R.get_or_init(|| {
        load_needed(&NVRTC_BUILTINS)?;
        load_needed(&NVRTC)?;
        Ok(())
    })
    .clone()
}

const NCCL: Needed = Needed { what: "NCCL 2 (libnccl.so.2)", names: &["libnccl.so.2", "libnccl.so"] };

/// NCCL, loaded on a data-parallel run's first collective on a GPU.
pub fn load_nccl() -> Result<(), String> {
    static R: OnceLock<Result<(), String>> = OnceLock::new();
    R.get_or_init(|| load_needed(&NCCL).map(|_| ())).clone()
}

/// Everything a GPU run needs: driver, NVRTC, cuBLASLt.
pub fn load_gpu_libraries() -> Result<(), String> {
    static R: OnceLock<Result<(), String>> = OnceLock::new();
    R.get_or_init(|| {
        load_needed(&DRIVER)?;
        load_nvrtc()?;
        load_needed(&CUBLASLT)?;
        Ok(())
    })
    .clone()
}

/// The directory with `cuda_bf16.h`: TESSERA_CUDA_INCLUDE, CUDA_HOME, the
/// CUDA install, the setup script's wheels, the Python environment.
pub fn include_dir() -> Result<PathBuf, String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("TESSERA_CUDA_INCLUDE") {
        dirs.push(PathBuf::from(v));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            dirs.push(PathBuf::from(&h).join("include"));
            dirs.push(PathBuf::from(&h).join("targets/x86_64-linux/include"));
        }
    }
    dirs.extend(["/usr/local/cuda/include", "/usr/local/cuda-13.0/include"].map(PathBuf::from));
    dirs.push(tools_root().join("include"));
    dirs.extend(python_nvidia_dirs("include"));
    dirs.into_iter().find(|d| d.join("cuda_bf16.h").is_file()).ok_or_else(|| {
        format!(
            "the CUDA headers (cuda_bf16.h) were not found: set TESSERA_CUDA_INCLUDE or CUDA_HOME, or run scripts/setup-cuda-tools.sh (installs them under {})",
            tools_root().display()
        )
    })
}

/// The C++ compiler of the host device: TESSERA_CXX, CXX, or g++.
pub fn cxx() -> String {
    for var in ["TESSERA_CXX", "CXX"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return v;
            }
        }
    }
    "g++".into()
}
