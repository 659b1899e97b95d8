//! Loading a TOML config file into a typed struct, with errors that name the file and the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Each on one line (the binaries print it as their last words): the file, where in it, and what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `at` is "line L, column C: " where the parser knows, empty where it does not.
    #[error("config {path}: {at}{message}")]
    Parse {
        path: PathBuf,
        at: String,
        message: String,
    },
}

/// Reads `path` as TOML into `T`; unknown keys are refused when `T` says `deny_unknown_fields`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    toml::from_str(&text).map_err(|e: toml::de::Error| {
        let at = e.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: ")
        });
        ConfigError::Parse {
            path: path.to_path_buf(),
            at: at.unwrap_or_default(),
            message: e.message().trim().replace('\n', " "),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)]
        listen: String,
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "listen = \"a\"\nlisten_adress = \"b\"\n").unwrap();
        let err = load::<Sample>(&path).unwrap_err().to_string();
        assert!(err.contains("x.toml: line 2, column 1:"), "{err}");
        assert!(err.contains("unknown field `listen_adress`"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
