//! The one reading of a service's TOML config file (Dom0's and the agent's): the text into the
//! service's own type, every key checked, and the one error both report (the file, then what is
//! wrong, on one line; exit code 64). Pure: the service reads the file and hands the text in.

use std::path::Path;

use serde::de::DeserializeOwned;

/// A config or flag error: printed as one line, exit code 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// The file at `path` could not be read.
    pub fn read(path: &Path, source: std::io::Error) -> ConfigError {
        ConfigError::Read {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Parses a config file's text (`origin` names it in the error).
pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_owned(),
        message: e.to_string().replace('\n', " ").trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[allow(dead_code)]
        name: Option<String>,
    }

    #[test]
    fn an_unknown_key_is_named_with_its_file_on_one_line() {
        let e = parse::<File>("nmae = \"x\"\n", "/etc/x.toml").unwrap_err();
        let line = e.to_string();
        assert!(line.starts_with("/etc/x.toml: "), "{line}");
        assert!(line.contains("nmae"), "{line}");
        assert!(!line.contains('\n'), "{line}");
        assert!(parse::<File>("name = \"x\"", "f").is_ok());
    }
}
