//! Secrets read from files (`--database-url-file`, `--database-password-file`,
//! `--kafka-options-file`): what a Kubernetes or Docker secret mount gives,
//! so that a password is never on a command line (`ps`) or in the process
//! environment. Errors name the flag and the path, never the contents.

use std::path::Path;

use crate::{Error, Result};

/// Reads a one-value secret file: the whole file, less one trailing line
/// break (as `echo` and most secret stores write it). An empty file is an
/// error rather than an empty password.
pub fn read_secret_file(path: &Path, flag: &str) -> Result<String> {
    let text = read(path, flag)?;
    let value = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if value.is_empty() {
        return Err(Error::Config(format!(
            "{flag} `{}` is empty; put the value in it (one line)",
            path.display()
        )));
    }
    if value.contains(['\n', '\r', '\0']) {
        return Err(Error::Config(format!(
            "{flag} `{}` holds more than one line (or a NUL byte); it must hold the value alone",
            path.display()
        )));
    }
    Ok(value.to_owned())
}

/// Reads librdkafka settings from a file, one `key=value` per line: blank
/// lines and lines starting with `#` are skipped, leading spaces dropped,
/// the value is the rest of the line after the first `=` verbatim (commas
/// and spaces included; no escapes, no line continuations, no `:` form). A
/// line without `=` is refused by its line number, without echoing it.
pub fn read_kafka_options_file(path: &Path, flag: &str) -> Result<Vec<String>> {
    let text = read(path, flag)?;
    let mut options = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.contains('=') {
            return Err(Error::Config(format!(
                "line {} of {flag} `{}` has no `=`; write one key=value per line (`#` starts a comment)",
                n + 1,
                path.display()
            )));
        }
        options.push(line.trim_end_matches('\r').to_owned());
    }
    Ok(options)
}

fn read(path: &Path, flag: &str) -> Result<String> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read {flag} `{}`: {e}", path.display())))?;
    warn_if_others_can_read(path, flag);
    String::from_utf8(bytes)
        .map_err(|_| Error::Config(format!("{flag} `{}` is not UTF-8 text", path.display())))
}

/// libpq ignores a `.pgpass` that others can read; a secret file is the
/// user's choice (Kubernetes mounts secrets 0644 by default, inside a
/// container of one user), so it is used, with a note.
fn warn_if_others_can_read(path: &Path, flag: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::info!(
            path = %path.display(),
            "{flag} can be read by every user on this machine; if others log in there, restrict it \
             (chmod 600 or 640, or defaultMode: 0400 for a Kubernetes secret)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("outbox-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_secret_file_is_its_value_without_the_line_break() {
        for (contents, want) in [
            (&b"s3cret\n"[..], "s3cret"),
            (b"s3cret\r\n", "s3cret"),
            (b"s3cret", "s3cret"),
            (b" spaced, with commas \n", " spaced, with commas "),
        ] {
            let path = file("pw", contents);
            assert_eq!(read_secret_file(&path, "--x-file").unwrap(), want);
        }
        for (contents, expect) in [
            (&b"\n"[..], "is empty"),
            (b"", "is empty"),
            (b"a\nb\n", "more than one line"),
            (b"\xff\xfe", "not UTF-8"),
        ] {
            let path = file("bad", contents);
            let err = read_secret_file(&path, "--x-file").unwrap_err().to_string();
            assert!(err.contains(expect) && err.contains("--x-file"), "{err}");
            assert!(!err.contains("\u{fffd}"), "{err}");
        }
        let err = read_secret_file(Path::new("/nonexistent/pw"), "--x-file")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read --x-file `/nonexistent/pw`"),
            "{err}"
        );
    }

    #[test]
    fn an_options_file_is_one_verbatim_setting_per_line() {
        let path = file(
            "kafka.properties",
            b"# managed Kafka\n\nsecurity.protocol=SASL_SSL\n  sasl.password=a,b=c\r\nlinger.ms=5",
        );
        assert_eq!(
            read_kafka_options_file(&path, "--k-file").unwrap(),
            [
                "security.protocol=SASL_SSL",
                "sasl.password=a,b=c",
                "linger.ms=5"
            ]
        );
        let path = file("bad.properties", b"linger.ms=5\nhunter2\n");
        let err = read_kafka_options_file(&path, "--k-file")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2 of --k-file"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
