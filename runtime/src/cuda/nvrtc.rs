//! NVRTC: kernel sources to PTX (for `ptxas` checks) or CUBIN (what a GPU
//! loads), through cudarc's raw layer. Runs without a GPU: CI compiles every
//! kernel of the reference models with it.
//!
//! Options: C++17, the CUDA headers' directory, IEEE arithmetic (no
//! fast math: the kernels must compute what the CPU backend computes).

use super::libs;
use cudarc::nvrtc::{result, sys};
use std::ffi::CString;

/// `13.0`: part of every cache key (a newer NVRTC's output may not load
/// on an older driver).
pub fn version() -> Result<String, String> {
    libs::load_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; the out-pointers are valid.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok(format!("{major}.{minor}"))
}

/// What one compilation gives.
pub struct Output {
    /// Machine code for `sm_XX` targets (empty for `compute_XX`).
    pub cubin: Vec<u8>,
    /// PTX for `compute_XX` targets (empty for `sm_XX`).
    pub ptx: String,
    pub log: String,
}

/// Compiles one translation unit for `arch` (`sm_90` gives CUBIN,
/// `compute_90` gives PTX).
pub fn compile(unit: &str, name: &str, arch: &str) -> Result<Output, String> {
    libs::load_nvrtc()?;
    let include = libs::include_dir()?;
    let src = CString::new(unit).map_err(|_| format!("kernel {name}: its source contains a NUL byte"))?;
    let file = CString::new(format!("{name}.cu")).expect("kernel names have no NUL");
    let prog = result::create_program(&src, Some(&file)).map_err(|e| format!("nvrtcCreateProgram ({name}): {e:?}"))?;
    let options = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        format!("--include-path={}", include.display()),
        "--device-as-default-execution-space".to_string(),
    ];
    // SAFETY: `prog` is live until destroyed at the end of this function.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| l.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect::<String>())
        .unwrap_or_default();
    let out = match compiled {
        Err(e) => Err(format!("NVRTC ({arch}) failed on kernel {name}: {e:?}\n{log}")),
        Ok(()) if arch.starts_with("sm_") => {
            let mut size = 0usize;
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))?;
            let mut cubin = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut _) }
                .result()
                .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
            Ok(Output { cubin, ptx: String::new(), log })
        }
        Ok(()) => {
            let ptx = unsafe { result::get_ptx(prog) }.map_err(|e| format!("nvrtcGetPTX: {e:?}"))?;
            let ptx: String = ptx.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
            Ok(Output { cubin: Vec::new(), ptx, log })
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}
