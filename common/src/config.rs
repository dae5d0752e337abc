//! Loading TOML configs so that every error names the file, the line and the reason.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub use toml::Spanned;

/// A config file's path and text, kept so that validation errors can point at a line.
#[derive(Clone, Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

/// A configuration error: `file:line:column: reason`, or `file: reason` when no place applies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based line and column, where the error has a place in the file.
    pub at: Option<(usize, usize)>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

impl SourceFile {
    /// Reads a config file; an unreadable file is a `ConfigError` too.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            at: None,
            reason: format!("cannot read: {e}"),
        })?;
        Ok(Self {
            path: path.to_owned(),
            text,
        })
    }

    /// Wraps text that did not come from disk (tests, the worker's copy of the master's config).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    /// Deserializes the whole file. Callers pass the result to their `validate`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            // toml's message repeats the snippet; the first line is the reason.
            let reason = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .trim()
                .to_owned();
            match e.span() {
                Some(span) => self.error_at(span, reason),
                None => self.error(reason),
            }
        })
    }

    /// An error at a byte span of the file (from a `Spanned` field).
    pub fn error_at(&self, span: Range<usize>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            at: Some(self.line_col(span.start)),
            reason: reason.into(),
        }
    }

    /// An error about the file as a whole (a missing section, say).
    pub fn error(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            at: None,
            reason: reason.into(),
        }
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text.as_bytes()[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = offset
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        (line, col)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        name: Spanned<String>,
        timeout: crate::Duration,
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let src =
            SourceFile::from_text("/etc/x.toml", "name = \"a\"\ntimeout = \"1s\"\nbogus = 1\n");
        let err = src
            .parse::<Demo>()
            .expect_err("unknown key must be refused");
        assert_eq!(err.at.map(|a| a.0), Some(3));
        assert!(err.to_string().starts_with("/etc/x.toml:3:"), "{err}");
        assert!(err.reason.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_unit_points_at_its_line() {
        let src = SourceFile::from_text("x.toml", "name = \"a\"\n\ntimeout = \"5parsecs\"\n");
        let err = src.parse::<Demo>().expect_err("bad unit must be refused");
        assert_eq!(err.at.map(|a| a.0), Some(3), "{err}");
        assert!(err.reason.contains("parsecs"), "{err}");
    }

    #[test]
    fn spanned_values_give_validation_errors_a_line() {
        let src = SourceFile::from_text("x.toml", "timeout = 5\nname = \"\"\n");
        let demo: Demo = src.parse().expect("valid syntax");
        let err = src.error_at(demo.name.span(), "name must not be empty");
        assert_eq!(err.to_string(), "x.toml:2:8: name must not be empty");
    }
}
