//! Loading: defaults, then a TOML file, then `HERALD_*` variables (see the module above), with
//! every unknown or bad value named by its variable or key; and `--help`'s list of settings.

use super::*;

impl Settings {
    /// Loads settings: defaults, then the TOML file if given, then `HERALD_*` variables from `env`.
    ///
    /// # Errors
    /// An unreadable or invalid file, an unknown variable, or a value of the wrong type.
    pub fn load(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let mut merged = to_value(&Settings::default())?;
        let sections = merged.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
                path: path.into(),
                source,
            })?;
            let table: Value = toml::from_str(&text).map_err(|source| Error::ParseFile {
                path: path.into(),
                source,
            })?;
            merge(&mut merged, table);
        }
        // Which variable set which key, so that a bad value's error names both.
        let mut set_by = Vec::new();
        for (var, raw) in env {
            let Some(path) = env_path(&var, &sections)? else {
                continue;
            };
            let key = path.join(".");
            set_path(&mut merged, &path, &raw).map_err(|why| match why {
                None => Error::UnknownEnv {
                    var: var.clone(),
                    suggestion: String::new(),
                },
                Some(why) => Error::Invalid(format!("{var} ({key}): {why}")),
            })?;
            set_by.push((key, var));
        }
        let settings: Settings = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            let within = |set: &str| {
                key.strip_prefix(set)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            };
            let origin = match set_by.iter().rev().find(|(set, _)| within(set)) {
                Some((_, var)) => format!("{var} ({key})"),
                None => match file {
                    Some(path) => format!("{key} (in {path})"),
                    None => key,
                },
            };
            Error::Invalid(format!("{origin}: {}", e.into_inner()))
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every setting as `(environment variable, default value)`, for `--help`.
    pub fn env_help() -> Vec<(String, String)> {
        let mut rows = Vec::new();
        if let Ok(defaults) = to_value(&Settings::default()) {
            flatten("", &defaults, &mut rows);
        }
        rows.into_iter()
            .map(|(path, value)| {
                let alias = ENV_ALIASES.iter().find(|(_, p)| *p == path);
                let var = match alias {
                    Some((var, _)) => (*var).to_owned(),
                    None => format!("{ENV_PREFIX}{}", path.replace('.', "__").to_uppercase()),
                };
                (var, value)
            })
            .collect()
    }
}

fn to_value(settings: &Settings) -> Result<Value, Error> {
    serde_json::to_value(settings).map_err(|e| Error::Invalid(e.to_string()))
}

/// Variables the binary reads itself: tracing's filter and the settings file.
const BINARY_ENV: &[&str] = &["HERALD_LOG", "HERALD_CONFIG"];

/// Maps `HERALD_QUEUE__PREFETCH` to `["queue", "prefetch"]`, and variables that are not settings to
/// `None`. A `HERALD_` name that is none of ours is refused when it looks like a setting's name
/// (one a typo away from a fixed name, or `HERALD_QUEUE_PREFETCH` for `HERALD_QUEUE__PREFETCH`),
/// and otherwise only warned about: a user may keep a `HERALD_KEY` of their own for curl.
/// (`HERALD_X__Y` always names a setting, and is refused later when it names none.)
fn env_path(var: &str, defaults: &Value) -> Result<Option<Vec<String>>, Error> {
    if let Some((_, path)) = ENV_ALIASES.iter().find(|(name, _)| *name == var) {
        return Ok(Some(path.split('.').map(str::to_owned).collect()));
    }
    let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
        return Ok(None);
    };
    if rest.contains("__") {
        return Ok(Some(rest.split("__").map(str::to_lowercase).collect()));
    }
    if BINARY_ENV.contains(&var) {
        return Ok(None);
    }
    let fixed = ENV_ALIASES
        .iter()
        .map(|(name, _)| *name)
        .chain(BINARY_ENV.iter().copied());
    let typo = fixed
        .filter(|name| strsim::levenshtein(name, var) <= 2)
        .map(str::to_owned)
        .next();
    let lower = rest.to_lowercase();
    let single_underscore = || {
        let (section, key) = lower.split_once('_')?;
        defaults.get(section)?.get(key)?;
        Some(format!("{ENV_PREFIX}{section}__{key}").to_uppercase())
    };
    if let Some(meant) = typo.or_else(single_underscore) {
        return Err(Error::UnknownEnv {
            var: var.to_owned(),
            suggestion: format!("; did you mean {meant}?"),
        });
    }
    if defaults.get(&lower).is_some() {
        return Err(Error::UnknownEnv {
            var: var.to_owned(),
            suggestion: format!("; a section's settings are {var}__<KEY>"),
        });
    }
    tracing::warn!(
        var,
        "ignoring a HERALD_ environment variable that names no setting"
    );
    Ok(None)
}

/// Sets the leaf at `path` from the raw string, typed like the default found there. `Err(None)`:
/// there is no such leaf; `Err(Some(why))`: the value cannot have that type.
fn set_path(root: &mut Value, path: &[String], raw: &str) -> Result<(), Option<String>> {
    let mut node = root;
    for key in path {
        node = node.as_object_mut().ok_or(None)?.get_mut(key).ok_or(None)?;
    }
    let number = |raw: &str, float: bool| {
        let parsed = if float {
            raw.parse().ok().and_then(serde_json::Number::from_f64)
        } else {
            raw.parse::<u64>()
                .map(serde_json::Number::from)
                .or_else(|_| raw.parse::<i64>().map(serde_json::Number::from))
                .ok()
        };
        let expected = if float { "a number" } else { "an integer" };
        parsed
            .map(Value::Number)
            .ok_or_else(|| Some(format!("invalid value {raw:?}, expected {expected}")))
    };
    *node = match node {
        Value::Number(n) => number(raw, n.is_f64())?,
        Value::Bool(_) => match raw {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => {
                return Err(Some(format!(
                    "invalid value {raw:?}, expected true or false"
                )));
            }
        },
        Value::Object(_) => return Err(None),
        // A list is comma-separated, its items typed like the default's (strings when it is empty).
        Value::Array(items) => {
            let float = match items.first() {
                Some(Value::Number(n)) => Some(n.is_f64()),
                _ => None,
            };
            let items = raw
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty());
            Value::Array(
                items
                    .map(|item| match float {
                        Some(float) => number(item, float),
                        None => Ok(Value::String(item.to_owned())),
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        _ => Value::String(raw.to_owned()),
    };
    Ok(())
}

fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    // Unknown keys stay, so deserialisation rejects them by name.
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

/// Every leaf under `value` as `(dotted key, the value as a variable would set it)`.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let shown = match value {
        Value::Object(map) => {
            for (key, value) in map {
                match prefix {
                    "" => flatten(key, value, out),
                    _ => flatten(&format!("{prefix}.{key}"), value, out),
                }
            }
            return;
        }
        Value::Null => "(unset)".into(),
        // Lists are set as comma-separated values, so show them that way.
        Value::Array(items) if items.is_empty() => "(none)".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => text(other),
    };
    out.push((prefix.to_owned(), shown));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_load_without_file_or_env() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.http.addr.port(), 4000);
        assert_eq!(s.queue.prefetch, 1_000);
        assert_eq!(s.queue.partitions, 16);
    }

    #[test]
    fn aliases_and_nested_variables_apply() {
        let s = Settings::load(
            None,
            env(&[
                ("HERALD_HTTP_ADDR", "0.0.0.0:8080"),
                ("HERALD_QUEUE__PREFETCH", "50"),
                ("HERALD_SECRET", "s3cret-s3cret-s3cret-s3cret-s3cret"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(s.http.addr.port(), 8080);
        assert_eq!(s.queue.prefetch, 50);
        assert_eq!(
            s.socket.secret.unwrap().expose(),
            "s3cret-s3cret-s3cret-s3cret-s3cret"
        );
    }

    fn load_err(pairs: &[(&str, &str)]) -> String {
        Settings::load(None, env(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_their_variable_and_key() {
        let err = load_err(&[("HERALD_QUEUE__PREFETCH", "many")]);
        let says =
            r#"HERALD_QUEUE__PREFETCH (queue.prefetch): invalid value "many", expected an integer"#;
        assert!(err.contains(says), "{err}");
        for (var, says) in [
            (
                "HERALD_QUEUE__PREFETCH=70000",
                "HERALD_QUEUE__PREFETCH (queue.prefetch): invalid",
            ),
            (
                "HERALD_RETRY__JITTER=lots",
                r#"(retry.jitter): invalid value "lots", expected a"#,
            ),
            (
                "HERALD_NODE__DEV=yes",
                "(node.dev): invalid value \"yes\", expected true or false",
            ),
            (
                "HERALD_RETRY__SCHEDULE_MS=10,x",
                "(retry.schedule_ms): invalid value \"x\"",
            ),
            (
                "HERALD_HTTP_ADDR=localhost",
                "HERALD_HTTP_ADDR (http.addr): invalid socket address",
            ),
            (
                "HERALD_QUEUE__QUEUE_TYPE=quorom",
                "(queue.queue_type): unknown variant `quorom`",
            ),
            (
                "HERALD_PUBSUB__MODE=mesh",
                "HERALD_PUBSUB__MODE (pubsub.mode): unknown variant",
            ),
            (
                "HERALD_NODE__ROLES=api,wroker",
                "(node.roles): unknown role wroker",
            ),
            (
                "HERALD_NODE__ROLES= , ",
                "(node.roles): name at least one role",
            ),
        ] {
            let (var, value) = var.split_once('=').unwrap();
            let err = load_err(&[(var, value)]);
            assert!(err.contains(says), "{var}={value}: {err}");
        }
    }

    #[test]
    fn bad_file_values_name_their_key_and_file() {
        let file = std::env::temp_dir().join(format!("herald-bad-{}.toml", std::process::id()));
        std::fs::write(&file, "[queue]\nprefetch = \"many\"\n").unwrap();
        let err = Settings::load(file.to_str(), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue.prefetch (in "), "{err}");
        std::fs::write(&file, "[queue]\nprefetch = 5\n").unwrap();
        let err = Settings::load(file.to_str(), env(&[("HERALD_QUEUE__PREFETCH", "x")]));
        assert!(
            err.unwrap_err()
                .to_string()
                .contains("HERALD_QUEUE__PREFETCH")
        );
        std::fs::remove_file(file).unwrap();
    }

    #[test]
    fn variables_that_look_like_settings_are_refused() {
        for (var, says) in [
            (
                "HERALD_QUEUE__PREFECT",
                "HERALD_QUEUE__PREFECT names no setting",
            ),
            ("HERALD_X__Y", "HERALD_X__Y names no setting"),
            ("HERALD_QUEUE", "HERALD_QUEUE names no setting"),
            ("HERALD_AMQP_URI", "did you mean HERALD_AMQP_URL?"),
            ("HERALD_SECRETS", "did you mean HERALD_SECRET?"),
            ("HERALD_DATABASE_UR", "did you mean HERALD_DATABASE_URL?"),
            (
                "HERALD_QUEUE_PREFETCH",
                "did you mean HERALD_QUEUE__PREFETCH?",
            ),
        ] {
            let err = load_err(&[(var, "5")]);
            assert!(err.contains(says), "{var}: {err}");
        }
    }

    #[test]
    fn other_herald_variables_are_ignored() {
        let s = Settings::load(
            None,
            env(&[
                ("HERALD_KEY", "hk_curl"),
                ("HERALD_HTTP_PROXY", "x"),
                ("HERALD_LOG", "debug"),
                ("HERALD_CONFIG", "/nowhere.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(s.queue.prefetch, 1_000);
    }

    #[test]
    fn enums_and_roles_parse() {
        let s = Settings::load(
            None,
            env(&[
                ("HERALD_QUEUE__QUEUE_TYPE", "classic"),
                ("HERALD_PUBSUB__MODE", "cluster"),
                ("HERALD_NODE__ROLES", "worker, api"),
            ]),
        )
        .unwrap();
        assert_eq!(s.queue.queue_type, QueueType::Classic);
        assert!(s.cluster());
        let roles = s.node.roles;
        assert!(roles.api && roles.worker && !roles.socket);
        assert_eq!(roles.names(), "api,worker");
        let err = load_err(&[("HERALD_NODE__ROLES", "socket")]);
        assert!(err.contains("pubsub.mode = cluster"), "{err}");
    }

    #[test]
    fn settings_built_in_code_are_validated() {
        let mut s = Settings::default();
        assert!(s.validate().is_ok());
        s.node.roles = "api".parse().unwrap();
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("pubsub.mode")
        );
        s.pubsub.mode = PubSubMode::Cluster;
        s.queue.prefetch = 0;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("queue.prefetch")
        );
    }

    #[test]
    fn commit_streams_need_partitions_and_write_connections() {
        let refused = |adjust: &dyn Fn(&mut Settings)| {
            let mut s = Settings::default();
            adjust(&mut s);
            s.validate().map_err(|e| e.to_string())
        };
        assert!(
            refused(&|s| {
                s.pipeline.commit_streams = 2;
                s.store.write_connections = 4;
            })
            .is_ok()
        );
        let too_many = refused(&|s| {
            s.pipeline.commit_streams = 17;
            s.store.write_connections = 19;
        });
        assert!(too_many.unwrap_err().contains("pipeline.commit_streams"));
        let no_connection = refused(&|s| s.pipeline.commit_streams = 2);
        assert!(
            no_connection
                .unwrap_err()
                .contains("store.write_connections")
        );
        assert!(
            refused(&|s| s.pipeline.commit_streams = 0)
                .unwrap_err()
                .contains("pipeline.commit_streams")
        );
    }

    #[test]
    fn lists_come_from_comma_separated_variables() {
        let s = Settings::load(
            None,
            env(&[
                ("HERALD_RETRY__SCHEDULE_MS", "100, 200,400"),
                ("HERALD_RETRY__MAX_ATTEMPTS", "4"),
                ("HERALD_FAULTS__FAIL_EVENTS", "poison,flaky:2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.retry.schedule_ms, vec![100, 200, 400]);
        assert_eq!(s.faults.fail_events, vec!["poison", "flaky:2"]);
        let err = Settings::load(None, env(&[("HERALD_RETRY__MAX_ATTEMPTS", "0")])).unwrap_err();
        assert!(err.to_string().contains("retry.max_attempts"), "{err}");
    }

    #[test]
    fn per_event_retry_policies_come_from_the_file_and_add_delay_queues() {
        let dir = std::env::temp_dir().join(format!("herald-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("retry.toml");
        std::fs::write(
            &file,
            "[retry]\nschedule_ms = [10, 20]\n[retry.events.invoice]\nschedule_ms = [20, 50]\nmax_attempts = 2\n",
        )
        .unwrap();
        let s = Settings::load(file.to_str(), env(&[])).unwrap();
        assert_eq!(s.retry.events["invoice"].max_attempts, Some(2));
        assert_eq!(s.retry.delays_ms(), vec![10, 20, 50]);
    }

    #[test]
    fn short_or_missing_secrets_are_refused_unless_dev() {
        for short in ["", "x", &"y".repeat(MIN_SECRET_BYTES - 1)] {
            let err = Settings::load(None, env(&[("HERALD_SECRET", short)])).unwrap_err();
            assert!(err.to_string().contains("HERALD_SECRET"), "{err}");
        }
        let unset = Settings::load(None, env(&[])).unwrap();
        assert!(unset.signing_secret().is_err(), "no secret, not dev");
        let dev = Settings::load(None, env(&[("HERALD_NODE__DEV", "true")])).unwrap();
        assert_eq!(
            dev.signing_secret().unwrap(),
            crate::token::DEVELOPMENT_SECRET
        );
        let long = "z".repeat(MIN_SECRET_BYTES);
        let set = Settings::load(None, env(&[("HERALD_SECRET", &long)])).unwrap();
        assert_eq!(set.signing_secret().unwrap(), long);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = Settings::default();
        assert!(!format!("{s:?}").contains("guest:guest"));
    }

    #[test]
    fn help_lists_every_setting_with_aliases() {
        let rows = Settings::env_help();
        assert!(rows.iter().any(|(v, _)| v == "HERALD_DATABASE_URL"));
        for (var, default) in [
            ("HERALD_QUEUE__PARTITIONS", "16"),
            ("HERALD_QUEUE__QUEUE_TYPE", "quorum"),
            ("HERALD_PUBSUB__MODE", "local"),
            ("HERALD_NODE__ROLES", "api,worker,socket"),
            ("HERALD_RETRY__SCHEDULE_MS", "1000,5000,30000,120000,600000"),
        ] {
            assert!(rows.iter().any(|(v, d)| v == var && d == default), "{var}");
        }
    }
}
