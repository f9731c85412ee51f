//! `netN` `rate`: traffic shaping on the host end of a container's veth, as PVE's
//! `PVE::Network::tap_rate_limit` sets it up when the interface is plugged.
//!
//! The rate is in MB/s (`rate=1.5`), converted to whole bytes per second
//! (`int(rate * 1024 * 1024)`), with a burst of 1 MiB. Traffic towards the container leaves
//! the host end, so an htb class shapes it; traffic from the container enters the host end,
//! so an ingress policer drops what exceeds the rate:
//!
//! ```text
//! tc qdisc add dev vethXiN root handle 1: htb default 1
//! tc class add dev vethXiN parent 1: classid 1:1 htb rate <rate>bps burst <burst>b
//! tc qdisc add dev vethXiN handle ffff: ingress
//! tc filter add dev vethXiN parent ffff: prio 50 basic police rate <rate>bps burst <burst>b mtu 64kb drop
//! ```
//!
//! Before that, PVE removes an earlier setup with four `del` commands whose failures are
//! expected (nothing to remove) and ignored. The ingress policer needs the kernel's `basic`
//! classifier and `police` action (`cls_basic`, `act_police`); without them the start fails
//! with a message that names them instead of running a container without the limit its
//! configuration asks for.

use vzkit_host::command::{Cmd, Runner};

use crate::error::{Result, RuntimeError};

/// The burst PVE allows, in bytes.
pub const BURST: u64 = 1024 * 1024;

/// `rate` (MB/s, as in `pct.conf`) in bytes per second; `None` for no limit (absent or 0).
///
/// # Errors
/// When the value is not a non-negative number.
pub fn bytes_per_second(rate: &str) -> Result<Option<u64>> {
    let mb: f64 = rate
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| RuntimeError::Invalid(format!("invalid rate '{rate}'")))?;
    // PVE: `int($rate * 1024 * 1024)`.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let bytes = (mb * 1024.0 * 1024.0) as u64;
    Ok((bytes > 0).then_some(bytes))
}

/// The commands that remove an earlier setup from `iface` (their failures are ignored).
#[must_use]
pub fn clear_commands(iface: &str) -> Vec<Cmd> {
    [
        vec![
            "class", "del", "dev", iface, "parent", "1:", "classid", "1:1",
        ],
        vec![
            "filter", "del", "dev", iface, "parent", "ffff:", "protocol", "all", "pref", "50",
            "u32",
        ],
        vec!["qdisc", "del", "dev", iface, "ingress"],
        vec!["qdisc", "del", "dev", iface, "root"],
    ]
    .into_iter()
    .map(|a| Cmd::new("tc").args(a))
    .collect()
}

/// The commands that limit `iface` to `rate` bytes per second.
#[must_use]
pub fn limit_commands(iface: &str, rate: u64) -> Vec<Cmd> {
    let rate = format!("{rate}bps");
    let burst = format!("{BURST}b");
    vec![
        Cmd::new("tc").args([
            "qdisc", "add", "dev", iface, "root", "handle", "1:", "htb", "default", "1",
        ]),
        Cmd::new("tc").args([
            "class", "add", "dev", iface, "parent", "1:", "classid", "1:1", "htb", "rate", &rate,
            "burst", &burst,
        ]),
        Cmd::new("tc").args(["qdisc", "add", "dev", iface, "handle", "ffff:", "ingress"]),
        Cmd::new("tc").args([
            "filter", "add", "dev", iface, "parent", "ffff:", "prio", "50", "basic", "police",
            "rate", &rate, "burst", &burst, "mtu", "64kb", "drop",
        ]),
    ]
}

/// Sets the limit `rate` (MB/s text) on the host interface `iface` of `key` (`net0`).
///
/// # Errors
/// An invalid rate, or a `tc` command that fails; the message names the interface and, when
/// the kernel lacks the classifier or action, the modules it needs.
pub async fn apply(runner: &dyn Runner, key: &str, iface: &str, rate: &str) -> Result<()> {
    let bytes = bytes_per_second(rate)?;
    for cmd in clear_commands(iface) {
        // Expected to fail when there is nothing to remove.
        let _ = runner.output(&cmd).await;
    }
    let Some(bytes) = bytes else {
        return Ok(());
    };
    for cmd in limit_commands(iface, bytes) {
        let out = runner.output(&cmd).await?;
        if !out.success() {
            let err = out.stderr_str();
            let hint = if cmd.argv().iter().any(|a| a == "basic") {
                " (the kernel needs the 'basic' classifier and 'police' action: cls_basic, act_police)"
            } else {
                ""
            };
            return Err(RuntimeError::Failed(format!(
                "{key}: unable to limit '{iface}' to rate {rate} MB/s - {}: {}{hint}",
                cmd.argv().join(" "),
                err.trim()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vzkit_host::command::{Output, RecordingRunner};

    #[test]
    fn rates_in_megabytes_become_whole_bytes_per_second() {
        assert_eq!(bytes_per_second("1").unwrap(), Some(1_048_576));
        assert_eq!(bytes_per_second("1.5").unwrap(), Some(1_572_864));
        assert_eq!(bytes_per_second("0.0000001").unwrap(), None);
        assert_eq!(bytes_per_second("0").unwrap(), None);
        assert_eq!(
            bytes_per_second("-1").unwrap_err().to_string(),
            "invalid rate '-1'"
        );
        assert!(bytes_per_second("fast").is_err());
    }

    #[tokio::test]
    async fn pve_command_sequence_and_a_clear_error_without_the_classifier() {
        let runner = RecordingRunner::new();
        for _ in 0..4 {
            runner.push_reply(Output::failed(2, "Error: Cannot find specified qdisc"));
        }
        for _ in 0..3 {
            runner.push_reply(Output::ok(""));
        }
        runner.push_reply(Output::failed(
            2,
            "Unknown filter \"basic\", hence option \"police\" is unparsable\n",
        ));
        let err = apply(&runner, "net0", "veth100i0", "1.5")
            .await
            .unwrap_err();
        assert_eq!(
            runner.call_lines(),
            [
                "tc class del dev veth100i0 parent 1: classid 1:1",
                "tc filter del dev veth100i0 parent ffff: protocol all pref 50 u32",
                "tc qdisc del dev veth100i0 ingress",
                "tc qdisc del dev veth100i0 root",
                "tc qdisc add dev veth100i0 root handle 1: htb default 1",
                "tc class add dev veth100i0 parent 1: classid 1:1 htb rate 1572864bps burst 1048576b",
                "tc qdisc add dev veth100i0 handle ffff: ingress",
                "tc filter add dev veth100i0 parent ffff: prio 50 basic police rate 1572864bps burst 1048576b mtu 64kb drop",
            ]
        );
        assert_eq!(
            err.to_string(),
            "net0: unable to limit 'veth100i0' to rate 1.5 MB/s - tc filter add dev veth100i0 \
             parent ffff: prio 50 basic police rate 1572864bps burst 1048576b mtu 64kb drop: \
             Unknown filter \"basic\", hence option \"police\" is unparsable (the kernel needs \
             the 'basic' classifier and 'police' action: cls_basic, act_police)"
        );
    }

    #[tokio::test]
    async fn no_rate_only_clears() {
        let runner = RecordingRunner::new();
        apply(&runner, "net1", "veth7i1", "0").await.unwrap();
        assert_eq!(runner.calls().len(), 4);
    }
}
