//! Triton's logging extension: which levels the server logs, changed at run time
//! (`/v2/logging`, gRPC `LogSettings`). The flags are read by a filter on every event,
//! so a change takes effect at once, without reloading the subscriber.

use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;
use tracing::Level;
use wisp_core::error::{Error, Result};

/// The highest verbose level that means something: 1 is DEBUG, 2 is TRACE.
const MAX_VERBOSE: u32 = 2;

pub struct LogControl {
    info: AtomicBool,
    warning: AtomicBool,
    error: AtomicBool,
    verbose: AtomicU32,
}

/// One setting of a request, as either front decodes it.
pub enum SettingValue {
    Bool(bool),
    Number(u64),
    Text(String),
}

impl LogControl {
    pub fn new(verbose: u32) -> Self {
        LogControl {
            info: AtomicBool::new(true),
            warning: AtomicBool::new(true),
            error: AtomicBool::new(true),
            verbose: AtomicU32::new(verbose.min(MAX_VERBOSE)),
        }
    }

    /// The process's settings (the subscriber in `main` filters with them).
    pub fn global() -> &'static LogControl {
        static GLOBAL: OnceLock<LogControl> = OnceLock::new();
        GLOBAL.get_or_init(|| LogControl::new(0))
    }

    /// Sets the verbose level once at startup, from the level `WISP_LOG` asks for.
    pub fn set_verbose(&self, level: u32) {
        self.verbose
            .store(level.min(MAX_VERBOSE), Ordering::Relaxed);
    }

    pub fn enabled(&self, level: &Level) -> bool {
        let verbose = self.verbose.load(Ordering::Relaxed);
        match *level {
            Level::ERROR => self.error.load(Ordering::Relaxed),
            Level::WARN => self.warning.load(Ordering::Relaxed),
            Level::INFO => self.info.load(Ordering::Relaxed),
            Level::DEBUG => verbose >= 1,
            Level::TRACE => verbose >= 2,
        }
    }

    /// Triton's `$log_setting_response`.
    pub fn settings(&self) -> Value {
        json!({
            // Logs go to stderr; a run-time file switch is refused (see `update`).
            "log_file": "",
            "log_info": self.info.load(Ordering::Relaxed),
            "log_warning": self.warning.load(Ordering::Relaxed),
            "log_error": self.error.load(Ordering::Relaxed),
            "log_verbose_level": self.verbose.load(Ordering::Relaxed),
            "log_format": "ISO8601",
        })
    }

    /// Applies a request's settings: all checked first, so a bad one changes nothing.
    pub fn update(&self, settings: Vec<(String, SettingValue)>) -> Result<()> {
        enum Change {
            Info(bool),
            Warning(bool),
            Error(bool),
            Verbose(u32),
        }
        let flag = |name: &str, value: &SettingValue| match value {
            SettingValue::Bool(b) => Ok(*b),
            _ => Err(Error::invalid(format!(
                "log setting '{name}' must be a boolean"
            ))),
        };
        let mut changes = Vec::with_capacity(settings.len());
        for (name, value) in &settings {
            let change = match name.as_str() {
                "log_info" => Change::Info(flag(name, value)?),
                "log_warning" => Change::Warning(flag(name, value)?),
                "log_error" => Change::Error(flag(name, value)?),
                "log_verbose_level" => match value {
                    SettingValue::Number(n) => {
                        Change::Verbose(u32::try_from(*n).unwrap_or(u32::MAX))
                    }
                    _ => {
                        return Err(Error::invalid(
                            "log setting 'log_verbose_level' must be a number >= 0",
                        ))
                    }
                },
                "log_format" => match value {
                    SettingValue::Text(f) if f == "ISO8601" => continue,
                    SettingValue::Text(f) => {
                        return Err(Error::invalid(format!(
                            "log format '{f}' is not available: wisp writes ISO8601 timestamps"
                        )))
                    }
                    _ => return Err(Error::invalid("log setting 'log_format' must be a string")),
                },
                "log_file" => match value {
                    SettingValue::Text(f) if f.is_empty() => continue,
                    _ => {
                        return Err(Error::invalid(
                            "log_file cannot be changed at run time: wisp logs to stderr \
                             (redirect it where the logs should go)",
                        ))
                    }
                },
                other => {
                    return Err(Error::invalid(format!(
                        "unknown log setting '{other}' (log_file, log_info, log_warning, \
                         log_error, log_verbose_level, log_format)"
                    )))
                }
            };
            changes.push(change);
        }
        for change in changes {
            match change {
                Change::Info(on) => self.info.store(on, Ordering::Relaxed),
                Change::Warning(on) => self.warning.store(on, Ordering::Relaxed),
                Change::Error(on) => self.error.store(on, Ordering::Relaxed),
                Change::Verbose(level) => self.set_verbose(level),
            }
        }
        Ok(())
    }

    /// Settings from Triton's JSON request body.
    pub fn update_json(&self, body: &Value) -> Result<()> {
        let object = body
            .as_object()
            .ok_or_else(|| Error::invalid("the log settings must be a JSON object"))?;
        self.update(from_json(object)?)
    }
}

fn from_json(object: &Map<String, Value>) -> Result<Vec<(String, SettingValue)>> {
    object
        .iter()
        .map(|(name, value)| {
            let value = match value {
                Value::Bool(b) => SettingValue::Bool(*b),
                Value::Number(n) => SettingValue::Number(n.as_u64().ok_or_else(|| {
                    Error::invalid(format!(
                        "log setting '{name}' must be a number >= 0, got {n}"
                    ))
                })?),
                Value::String(s) => SettingValue::Text(s.clone()),
                other => {
                    return Err(Error::invalid(format!(
                        "log setting '{name}' must be a boolean, number or string, got {other}"
                    )))
                }
            };
            Ok((name.clone(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_change_levels_and_bad_ones_change_nothing() {
        let control = LogControl::new(0);
        assert!(control.enabled(&Level::INFO) && !control.enabled(&Level::DEBUG));
        control
            .update_json(&json!({"log_info": false, "log_verbose_level": 1}))
            .unwrap();
        assert!(!control.enabled(&Level::INFO) && control.enabled(&Level::DEBUG));
        assert!(!control.enabled(&Level::TRACE) && control.enabled(&Level::ERROR));
        assert_eq!(control.settings()["log_verbose_level"], 1);

        for (bad, named) in [
            (json!({"log_warning": false, "log_info": "yes"}), "log_info"),
            (
                json!({"log_warning": false, "log_verbose_level": -1}),
                "log_verbose_level",
            ),
            (
                json!({"log_warning": false, "log_file": "/etc/passwd"}),
                "log_file",
            ),
            (
                json!({"log_warning": false, "log_colour": true}),
                "log_colour",
            ),
            (
                json!({"log_warning": false, "log_format": "default"}),
                "default",
            ),
        ] {
            let e = control.update_json(&bad).unwrap_err();
            assert!(e.message.contains(named), "{}", e.message);
            // Nothing applied, not even the valid setting before the bad one.
            assert!(control.enabled(&Level::WARN));
        }
        control
            .update_json(&json!({"log_verbose_level": 7}))
            .unwrap();
        assert_eq!(control.settings()["log_verbose_level"], MAX_VERBOSE);
    }
}
