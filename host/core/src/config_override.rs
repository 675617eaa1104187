//! Triton's configuration override on a model load (`parameters.config` of a load
//! request: a model configuration in Triton's JSON), applied over `config.toml`.
//!
//! Triton replaces the whole configuration and completes what is missing from the
//! model files. A wisp model's inputs and outputs live in its config.toml, so here each
//! top-level key the override gives replaces that key of config.toml (`parameters` one
//! by one), and the result is checked like any config.toml. Keys wisp has no equivalent
//! for are refused by name rather than ignored.

use crate::error::{Error, Result};
use serde_json::{Map, Value};

/// The override JSON's size limit (a configuration, not data).
pub const MAX_OVERRIDE_BYTES: usize = 64 << 10;

fn bad(key: &str, what: impl std::fmt::Display) -> Error {
    Error::invalid(format!("the config override's '{key}' {what}"))
}

/// An integer given as a JSON number or as a string of digits (protobuf's JSON form
/// of 64-bit integers, which Triton's clients also use for smaller ones).
fn integer(key: &str, value: &Value) -> Result<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| bad(key, format!("must be an integer, got {value}")))
}

fn unsigned(key: &str, value: &Value) -> Result<i64> {
    let n = integer(key, value)?;
    if n < 0 {
        return Err(bad(key, format!("must not be negative, got {n}")));
    }
    Ok(n)
}

fn boolean(key: &str, value: &Value) -> Result<bool> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        _ => Err(bad(key, format!("must be a bool, got {value}"))),
    }
}

fn string<'a>(key: &str, value: &'a Value) -> Result<&'a str> {
    value
        .as_str()
        .ok_or_else(|| bad(key, format!("must be a string, got {value}")))
}

fn object<'a>(key: &str, value: &'a Value) -> Result<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| bad(key, format!("must be an object, got {value}")))
}

fn array<'a>(key: &str, value: &'a Value) -> Result<&'a Vec<Value>> {
    value
        .as_array()
        .ok_or_else(|| bad(key, format!("must be a list, got {value}")))
}

fn integers(key: &str, value: &Value, unsigned_only: bool) -> Result<toml::Value> {
    array(key, value)?
        .iter()
        .map(|v| {
            if unsigned_only {
                unsigned(key, v)
            } else {
                integer(key, v)
            }
            .map(toml::Value::Integer)
        })
        .collect::<Result<Vec<_>>>()
        .map(toml::Value::Array)
}

/// Triton's `TYPE_INT32` as wisp's `INT32` (`TYPE_STRING` is `BYTES`).
fn datatype(key: &str, value: &Value) -> Result<toml::Value> {
    let name = string(key, value)?;
    let plain = name.strip_prefix("TYPE_").unwrap_or(name);
    let mapped = match plain {
        "STRING" => "BYTES",
        "BOOL" => "BOOL",
        other => other,
    };
    Ok(toml::Value::String(mapped.to_string()))
}

/// Fails on a key of `table` that is not in `known`.
fn only(key: &str, table: &Map<String, Value>, known: &[&str]) -> Result<()> {
    match table.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(
            &format!("{key}.{k}"),
            format!("is not supported (supported: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

fn tensors(key: &str, value: &Value) -> Result<toml::Value> {
    let mut out = Vec::new();
    for (i, tensor) in array(key, value)?.iter().enumerate() {
        let at = format!("{key}[{i}]");
        let t = object(&at, tensor)?;
        only(&at, t, &["name", "data_type", "dims", "optional"])?;
        let mut table = toml::Table::new();
        for (k, v) in t {
            let item = format!("{at}.{k}");
            let converted = match k.as_str() {
                "name" => ("name", toml::Value::String(string(&item, v)?.to_string())),
                "data_type" => ("datatype", datatype(&item, v)?),
                "dims" => ("dims", integers(&item, v, false)?),
                _ => ("optional", toml::Value::Boolean(boolean(&item, v)?)),
            };
            table.insert(converted.0.to_string(), converted.1);
        }
        out.push(toml::Value::Table(table));
    }
    Ok(toml::Value::Array(out))
}

fn instance_groups(value: &Value) -> Result<toml::Value> {
    let mut out = Vec::new();
    for (i, group) in array("instance_group", value)?.iter().enumerate() {
        let at = format!("instance_group[{i}]");
        let g = object(&at, group)?;
        only(&at, g, &["name", "count", "kind", "gpus"])?;
        let mut table = toml::Table::new();
        for (k, v) in g {
            let item = format!("{at}.{k}");
            match k.as_str() {
                "name" => {}
                "count" => {
                    table.insert("count".into(), toml::Value::Integer(unsigned(&item, v)?));
                }
                "kind" => {
                    let kind = match string(&item, v)? {
                        "KIND_CPU" | "KIND_AUTO" => "cpu",
                        "KIND_GPU" => "gpu",
                        other => {
                            return Err(bad(
                                &item,
                                format!("must be KIND_CPU, KIND_GPU or KIND_AUTO, got '{other}'"),
                            ))
                        }
                    };
                    table.insert("kind".into(), toml::Value::String(kind.into()));
                }
                _ => {
                    table.insert("gpus".into(), integers(&item, v, true)?);
                }
            }
        }
        out.push(toml::Value::Table(table));
    }
    Ok(toml::Value::Array(out))
}

fn queue_policy(key: &str, value: &Value) -> Result<toml::Value> {
    let p = object(key, value)?;
    only(
        key,
        p,
        &[
            "timeout_action",
            "default_timeout_microseconds",
            "allow_timeout_override",
            "max_queue_size",
        ],
    )?;
    let mut table = toml::Table::new();
    for (k, v) in p {
        let item = format!("{key}.{k}");
        match k.as_str() {
            "timeout_action" => {
                let action = match string(&item, v)? {
                    "REJECT" => "reject",
                    "DELAY" => "delay",
                    other => {
                        return Err(bad(
                            &item,
                            format!("must be REJECT or DELAY, got '{other}'"),
                        ))
                    }
                };
                table.insert("timeout_action".into(), toml::Value::String(action.into()));
            }
            "default_timeout_microseconds" => {
                table.insert(
                    "timeout_us".into(),
                    toml::Value::Integer(unsigned(&item, v)?),
                );
            }
            "allow_timeout_override" => {
                table.insert(k.clone(), toml::Value::Boolean(boolean(&item, v)?));
            }
            _ => {
                table.insert(k.clone(), toml::Value::Integer(unsigned(&item, v)?));
            }
        }
    }
    Ok(toml::Value::Table(table))
}

fn dynamic_batching(value: &Value) -> Result<toml::Value> {
    let key = "dynamic_batching";
    let d = object(key, value)?;
    only(
        key,
        d,
        &[
            "preferred_batch_size",
            "max_queue_delay_microseconds",
            "preserve_ordering",
            "priority_levels",
            "default_priority_level",
            "default_queue_policy",
            "priority_queue_policy",
            "max_batch_tokens",
            "dispatch",
        ],
    )?;
    let mut table = toml::Table::new();
    for (k, v) in d {
        let item = format!("{key}.{k}");
        let (name, converted) = match k.as_str() {
            "preferred_batch_size" => (k.as_str(), integers(&item, v, true)?),
            "max_queue_delay_microseconds" => (
                "max_queue_delay_us",
                toml::Value::Integer(unsigned(&item, v)?),
            ),
            "preserve_ordering" => (k.as_str(), toml::Value::Boolean(boolean(&item, v)?)),
            "priority_levels" | "default_priority_level" => {
                (k.as_str(), toml::Value::Integer(unsigned(&item, v)?))
            }
            "default_queue_policy" => (k.as_str(), queue_policy(&item, v)?),
            "max_batch_tokens" => (k.as_str(), toml::Value::Integer(unsigned(&item, v)?)),
            "dispatch" => (
                k.as_str(),
                toml::Value::String(
                    v.as_str()
                        .ok_or_else(|| {
                            Error::invalid(format!("'{item}' must be \"delay\" or \"eager\""))
                        })?
                        .to_string(),
                ),
            ),
            _ => {
                let mut levels = toml::Table::new();
                for (level, policy) in object(&item, v)? {
                    levels.insert(
                        level.clone(),
                        queue_policy(&format!("{item}.{level}"), policy)?,
                    );
                }
                (k.as_str(), toml::Value::Table(levels))
            }
        };
        table.insert(name.to_string(), converted);
    }
    Ok(toml::Value::Table(table))
}

fn version_policy(value: &Value) -> Result<toml::Value> {
    let key = "version_policy";
    let p = object(key, value)?;
    only(key, p, &["latest", "all", "specific"])?;
    let (kind, inner) = p
        .iter()
        .next()
        .ok_or_else(|| bad(key, "must name one of latest, all, specific"))?;
    let item = format!("{key}.{kind}");
    let inner = object(&item, inner)?;
    Ok(match kind.as_str() {
        "all" => toml::Value::String("all".into()),
        "latest" => {
            let n = inner
                .get("num_versions")
                .map(|v| unsigned(&format!("{item}.num_versions"), v))
                .transpose()?
                .unwrap_or(1);
            toml::Value::Table(toml::Table::from_iter([(
                "latest".to_string(),
                toml::Value::Integer(n),
            )]))
        }
        _ => {
            let versions = inner
                .get("versions")
                .ok_or_else(|| bad(&item, "needs 'versions'"))?;
            toml::Value::Table(toml::Table::from_iter([(
                "specific".to_string(),
                integers(&format!("{item}.versions"), versions, true)?,
            )]))
        }
    })
}

/// A Triton parameter's `string_value`, typed like the same key of config.toml where it
/// has one (wisp's parameters are typed; Triton's are strings).
fn parameter(key: &str, value: &Value, existing: Option<&toml::Value>) -> Result<toml::Value> {
    let text = match value {
        Value::Object(p) => {
            only(key, p, &["string_value"])?;
            string(
                &format!("{key}.string_value"),
                p.get("string_value")
                    .ok_or_else(|| bad(key, "needs 'string_value'"))?,
            )?
            .to_string()
        }
        other => string(key, other)?.to_string(),
    };
    Ok(match existing {
        Some(toml::Value::Boolean(_)) => match text.as_str() {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            _ => {
                return Err(bad(
                    key,
                    format!("must be \"true\" or \"false\", got '{text}'"),
                ))
            }
        },
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            text.trim()
                .parse()
                .map_err(|_| bad(key, format!("must be an integer, got '{text}'")))?,
        ),
        Some(toml::Value::Float(_)) => toml::Value::Float(
            text.trim()
                .parse()
                .map_err(|_| bad(key, format!("must be a number, got '{text}'")))?,
        ),
        _ => toml::Value::String(text),
    })
}

/// `base` (the text of config.toml) with the override applied, as config.toml text.
pub fn apply(base: &str, override_json: &str) -> Result<String> {
    if override_json.len() > MAX_OVERRIDE_BYTES {
        return Err(Error::invalid(format!(
            "the config override is larger than {} KiB",
            MAX_OVERRIDE_BYTES >> 10
        )));
    }
    let value: Value = serde_json::from_str(override_json)
        .map_err(|e| Error::invalid(format!("the config override is not valid JSON: {e}")))?;
    let overrides = value.as_object().ok_or_else(|| {
        Error::invalid(format!(
            "the config override must be a JSON object (a model configuration), got {value}"
        ))
    })?;
    let mut table: toml::Table =
        toml::from_str(base).map_err(|e| Error::invalid(e.to_string().trim_end().to_string()))?;
    for (key, value) in overrides {
        let converted = match key.as_str() {
            "name" => toml::Value::String(string(key, value)?.to_string()),
            "backend" => toml::Value::String(string(key, value)?.to_string()),
            "platform" => match string(key, value)? {
                "ensemble" => {
                    table.insert("backend".into(), toml::Value::String("ensemble".into()));
                    continue;
                }
                other => {
                    return Err(bad(
                        key,
                        format!("'{other}' is not a wisp backend (wisp has 'backend' = wasm, encoder or ensemble)"),
                    ))
                }
            },
            "max_batch_size" => toml::Value::Integer(unsigned(key, value)?),
            "input" | "output" => tensors(key, value)?,
            "instance_group" => instance_groups(value)?,
            "dynamic_batching" => dynamic_batching(value)?,
            "version_policy" => version_policy(value)?,
            "parameters" => {
                let mut parameters = match table.remove("parameters") {
                    Some(toml::Value::Table(t)) => t,
                    _ => toml::Table::new(),
                };
                for (name, v) in object(key, value)? {
                    let converted =
                        parameter(&format!("parameters.{name}"), v, parameters.get(name))?;
                    parameters.insert(name.clone(), converted);
                }
                toml::Value::Table(parameters)
            }
            other => {
                return Err(bad(
                    other,
                    "is not supported in an override (supported: name, backend, platform, max_batch_size, input, output, instance_group, dynamic_batching, version_policy, parameters); change config.toml instead",
                ))
            }
        };
        table.insert(key.clone(), converted);
    }
    // Triton's names for the tensor lists are `input`/`output`, as wisp's are.
    toml::to_string(&table)
        .map_err(|e| Error::internal(format!("cannot write the overridden config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn simple() -> String {
        format!(
            "{}\n[parameters]\nthreads = 2\nfast = false\n",
            crate::config::tests::SIMPLE
        )
    }

    fn apply_and_parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::parse(&apply(&simple(), json)?, "simple")
    }

    #[test]
    fn tritons_example_override_changes_max_batch_size_and_keeps_the_rest() {
        let config = apply_and_parse(r#"{"max_batch_size":"16"}"#).unwrap();
        assert_eq!(config.max_batch_size, 16);
        assert_eq!(config.inputs[0].name, "INPUT0");
        assert_eq!(config.parameters.len(), 2);
    }

    #[test]
    fn tritons_json_names_map_to_wisp_keys() {
        let config = apply_and_parse(
            r#"{"input": [{"name": "X", "data_type": "TYPE_STRING", "dims": ["-1"]}],
                "instance_group": [{"count": 2, "kind": "KIND_CPU", "name": "g"}],
                "dynamic_batching": {"max_queue_delay_microseconds": 100,
                    "default_queue_policy": {"max_queue_size": 4, "timeout_action": "DELAY",
                        "default_timeout_microseconds": "50"}},
                "version_policy": {"latest": {"num_versions": 2}},
                "parameters": {"threads": {"string_value": "4"}, "fast": {"string_value": "true"},
                    "label": {"string_value": "x"}}}"#,
        )
        .unwrap();
        assert_eq!(config.inputs[0].name, "X");
        assert_eq!(config.inputs[0].datatype.as_str(), "BYTES");
        assert_eq!(config.inputs[0].dims, [-1]);
        assert_eq!(config.instance_group[0].count, 2);
        let batching = config.dynamic_batching.unwrap();
        assert_eq!(batching.max_queue_delay_us, 100);
        assert_eq!(batching.default_queue_policy.max_queue_size, 4);
        assert_eq!(batching.default_queue_policy.timeout_us, 50);
        assert_eq!(
            config.version_policy,
            crate::config::VersionPolicy::Latest(2)
        );
        use crate::config::ParameterValue::*;
        assert_eq!(config.parameters["threads"], Int(4));
        assert_eq!(config.parameters["fast"], Bool(true));
        assert_eq!(config.parameters["label"], Text("x".into()));
    }

    #[test]
    fn a_bad_override_names_what_is_wrong() {
        let error = |json: &str| apply_and_parse(json).unwrap_err().message;
        // Triton's example sends this malformed text and expects a failure.
        assert!(
            error(r#""parameters": {"config": {{"max_batch_size": "16"}}}"#)
                .contains("not valid JSON")
        );
        assert!(error("[1]").contains("must be a JSON object"));
        assert!(error(r#"{"max_batch_size": "many"}"#)
            .contains("'max_batch_size' must be an integer, got \"many\""));
        assert!(error(r#"{"model_warmup": []}"#).contains("'model_warmup' is not supported"));
        assert!(
            error(r#"{"input": [{"name": "X", "format": "FORMAT_NHWC"}]}"#)
                .contains("'input[0].format' is not supported")
        );
        assert!(
            error(r#"{"parameters": {"threads": {"string_value": "two"}}}"#)
                .contains("'parameters.threads' must be an integer, got 'two'")
        );
        assert!(error(r#"{"name": "other"}"#).contains("key 'name' is 'other'"));
        assert!(error(r#"{"max_batch_size": 100000000}"#).contains("max_batch_size"));
        let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(MAX_OVERRIDE_BYTES));
        assert!(error(&huge).contains("larger than 64 KiB"));
    }
}
