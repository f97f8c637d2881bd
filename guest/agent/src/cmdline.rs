//! Switches the agent reads from the kernel command line (`/proc/cmdline`).

/// What `podflare.*` switches asked for. Everything else on the line is the
/// kernel's business and is ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// `podflare.selftest=1`: run a python and a bash command, print their
    /// output on the console, power off. Used by the QEMU boot test.
    pub selftest: bool,
    /// `podflare.pvm=1`: the host KVM is PVM; keep guest programs off AVX.
    pub pvm: bool,
    /// `podflare.debug=1`: extra diagnostics on the console.
    pub debug: bool,
}

/// Parses a kernel command line. Unknown or malformed words are ignored: the
/// line is written by the VMM, and a typo must not stop the boot.
pub fn parse(cmdline: &str) -> Flags {
    let mut flags = Flags::default();
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, v),
            // A bare `podflare.debug` means on, like kernel boolean switches.
            None => (word, "1"),
        };
        let on = matches!(value, "1" | "y" | "yes" | "on" | "true");
        match key {
            "podflare.selftest" => flags.selftest = on,
            "podflare.pvm" => flags.pvm = on,
            "podflare.debug" => flags.debug = on,
            _ => {}
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_switches_among_kernel_ones() {
        let f = parse("console=ttyS0 root=/dev/vda ro podflare.selftest=1 podflare.pvm=1 quiet\n");
        assert_eq!(
            f,
            Flags {
                selftest: true,
                pvm: true,
                debug: false
            }
        );
    }

    #[test]
    fn zero_and_garbage_mean_off() {
        let f = parse("podflare.selftest=0 podflare.pvm=banana podflare.debug");
        assert_eq!(
            f,
            Flags {
                selftest: false,
                pvm: false,
                debug: true
            }
        );
        assert_eq!(parse(""), Flags::default());
        assert_eq!(
            parse("podflare.pvmx=1 xpodflare.pvm=1 ==="),
            Flags::default()
        );
    }

    #[test]
    fn last_word_wins() {
        assert!(!parse("podflare.pvm=1 podflare.pvm=0").pvm);
    }
}
