//! The environment of every process the agent starts (the REPL, bash execs,
//! the selftest), and through inheritance of everything those start.

/// Directories searched for commands; the usual Debian root PATH.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds `KEY=value` strings for a child process.
pub fn child_env(pvm: bool) -> Vec<String> {
    let mut env: Vec<String> = [
        ("PATH", PATH),
        ("HOME", "/root"),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SHELL", "/bin/bash"),
        ("TERM", "xterm"),
        ("LANG", "C.UTF-8"),
        ("HOSTNAME", "sandbox"),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={v}"))
    .collect();
    if pvm {
        env.extend(pvm_no_avx_env().iter().map(|(k, v)| format!("{k}={v}")));
        let npy = numpy_avx_targets(cpu_has);
        if !npy.is_empty() {
            env.push(format!("NPY_DISABLE_CPU_FEATURES={}", npy.join(",")));
        }
    }
    env
}

/// What this CPU (as user code sees it: on PVM `cpuid` reports the host's
/// features) and OS support, with the names `std` detection uses.
fn cpu_has(feature: &str) -> bool {
    match feature {
        "avx" => std::arch::is_x86_feature_detected!("avx"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512cd" => std::arch::is_x86_feature_detected!("avx512cd"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "avx512ifma" => std::arch::is_x86_feature_detected!("avx512ifma"),
        "avx512vbmi" => std::arch::is_x86_feature_detected!("avx512vbmi"),
        "avx512vbmi2" => std::arch::is_x86_feature_detected!("avx512vbmi2"),
        "avx512bitalg" => std::arch::is_x86_feature_detected!("avx512bitalg"),
        "avx512vpopcntdq" => std::arch::is_x86_feature_detected!("avx512vpopcntdq"),
        _ => false,
    }
}

/// numpy 1.24's AVX-family dispatch targets that this machine supports,
/// for `NPY_DISABLE_CPU_FEATURES`. numpy prints a RuntimeWarning on every
/// import if that list names a target it does not dispatch (AVX512_KNL/KNM
/// in Debian's build) or one the machine lacks, so the list is computed
/// here from the CPU, with numpy's own group definitions
/// (numpy/core/src/common/npy_cpu_features.c).
pub fn numpy_avx_targets(has: impl Fn(&str) -> bool) -> Vec<&'static str> {
    let skx = ["avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"]
        .iter()
        .all(|f| has(f));
    let clx = skx && has("avx512vnni");
    let cnl = skx && has("avx512ifma") && has("avx512vbmi");
    let icl = clx && cnl && has("avx512vbmi2") && has("avx512bitalg") && has("avx512vpopcntdq");
    let avx512cd = has("avx512f") && has("avx512cd");
    [
        ("AVX", has("avx")),
        ("F16C", has("f16c")),
        ("FMA3", has("fma")),
        ("AVX2", has("avx2")),
        ("AVX512F", has("avx512f")),
        ("AVX512CD", avx512cd),
        ("AVX512_SKX", skx),
        ("AVX512_CLX", clx),
        ("AVX512_CNL", cnl),
        ("AVX512_ICL", icl),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// Keeps user code off AVX/AVX2/AVX-512 when the host KVM is PVM.
///
/// Why: on PVM a user-mode `cpuid` traps to the host and reports the host's
/// features whatever CPUID the VMM configured, so glibc, numpy and BLAS pick
/// AVX code paths. The guest kernel runs with `noxsave` there and saves only
/// the low 128 bits of each vector register on a context switch, so the upper
/// halves of YMM/ZMM registers leak between processes and corrupt results.
/// SSE (XMM) state is saved by `fxsave` and stays safe. Each variable masks one
/// library's own CPU dispatch; the spellings were checked against the
/// library versions in the Debian bookworm image:
/// - glibc 2.36 `glibc.cpu.hwcaps`: names without the old `_Usable` suffix
///   (`-AVX2_Usable` is silently ignored by 2.36). Verified with
///   `ld.so --list-diagnostics`: each name below clears its `active` bit
///   (FMA uses VEX/YMM too; `AVX_Fast_Unaligned_Load` steers memcpy to AVX).
///   AVX512ER/PF are accepted names for CPUs that have them.
/// - numpy 1.24 `NPY_DISABLE_CPU_FEATURES`: its AVX-family dispatch targets,
///   computed per machine by [`numpy_avx_targets`] and added by [`child_env`].
/// - OpenBLAS `OPENBLAS_CORETYPE=Nehalem`: the newest kernel set without AVX.
/// - MKL (if a user installs it) `MKL_ENABLE_INSTRUCTIONS=SSE4_2`.
/// - OpenSSL 3.0 (`hashlib`, `ssl`) `OPENSSL_ia32cap`: `~` clears bits of the
///   detected capability vector. Word 0 is CPUID.1:EDX|ECX<<32: AVX (bit 60),
///   F16C (61), FMA (44). Word 1 is CPUID.7:EBX|ECX<<32: AVX2 (5), AVX512F/DQ/
///   IFMA/PF/ER/CD/BW/VL (16,17,21,26,27,28,30,31), VBMI/VBMI2/VAES/VPCLMULQDQ/
///   VNNI/BITALG/VPOPCNTDQ (33,38,41,42,43,44,46). SHA-NI and AES-NI stay on:
///   they only touch XMM registers.
pub fn pvm_no_avx_env() -> [(&'static str, &'static str); 4] {
    [
        (
            "GLIBC_TUNABLES",
            "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512DQ,-AVX512BW,-AVX512VL,-AVX512CD,\
             -AVX512ER,-AVX512PF,-FMA,-AVX_Fast_Unaligned_Load",
        ),
        ("OPENBLAS_CORETYPE", "Nehalem"),
        ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2"),
        ("OPENSSL_ia32cap", "~0x3000100000000000:~0x00005E42DC230020"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_adds_masks_and_nothing_else_changes() {
        let plain = child_env(false);
        let pvm = child_env(true);
        assert!(plain.iter().all(|v| pvm.contains(v)));
        let npy = usize::from(!numpy_avx_targets(cpu_has).is_empty());
        assert_eq!(pvm.len(), plain.len() + pvm_no_avx_env().len() + npy);
        assert!(!plain.iter().any(|v| v.starts_with("GLIBC_TUNABLES=")));
        let tun = pvm
            .iter()
            .find(|v| v.starts_with("GLIBC_TUNABLES="))
            .unwrap();
        // glibc 2.36 ignores the pre-2.33 "_Usable" spellings.
        assert!(!tun.contains("_Usable"));
        assert!(tun.contains("-AVX2,") && !tun.contains(' '));
        assert!(pvm.iter().all(|v| !v.contains(' ') && v.contains('=')));
    }

    #[test]
    fn numpy_targets_follow_the_cpu() {
        let all = |_: &str| true;
        assert_eq!(
            numpy_avx_targets(all).join(","),
            "AVX,F16C,FMA3,AVX2,AVX512F,AVX512CD,AVX512_SKX,AVX512_CLX,AVX512_CNL,AVX512_ICL"
        );
        assert!(numpy_avx_targets(|_| false).is_empty());
        // An AVX2 machine without AVX-512 (most laptops, older servers).
        let avx2 = |f: &str| matches!(f, "avx" | "f16c" | "fma" | "avx2");
        assert_eq!(numpy_avx_targets(avx2).join(","), "AVX,F16C,FMA3,AVX2");
        // Skylake-SP: SKX and CLX-less.
        let skx = |f: &str| {
            !matches!(
                f,
                "avx512vnni"
                    | "avx512ifma"
                    | "avx512vbmi"
                    | "avx512vbmi2"
                    | "avx512bitalg"
                    | "avx512vpopcntdq"
            )
        };
        assert_eq!(
            numpy_avx_targets(skx).join(","),
            "AVX,F16C,FMA3,AVX2,AVX512F,AVX512CD,AVX512_SKX"
        );
    }

    #[test]
    fn home_and_path_are_root_defaults() {
        let env = child_env(false);
        assert!(env.contains(&"HOME=/root".to_string()));
        assert!(env.contains(&format!("PATH={PATH}")));
        assert!(env.contains(&"TERM=xterm".to_string()));
    }
}
