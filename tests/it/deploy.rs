//! The deployment examples README's "Running it as a service" points at (`deploy/`), read as systemd
//! and Kubernetes would read them, and the nodes they describe started from them: their commands,
//! their environment (with this test's database, broker and ports put in), their readiness check,
//! and their stop signal, which must end in a clean drain.

use crate::common::{DropsDeployment, PATIENCE, amqp_url, test_settings, wait_until};
use herald::config::Settings;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::time::timeout;

const HERALD: &str = env!("CARGO_BIN_EXE_herald");
const INSTALLED: &str = "/usr/local/bin/herald";

fn repo_file(path: &str) -> String {
    let path = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A systemd unit's `(section, key) -> values` (a key may repeat, as EnvironmentFile does).
fn parse_unit(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut keys: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        keys.entry((section.clone(), key.trim().to_owned()))
            .or_default()
            .push(value.trim().to_owned());
    }
    keys
}

/// An environment file's variables, in order.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not VAR=value: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

async fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// The described node's environment with this test's deployment put in: its database, broker,
/// queue prefix and secret, loopback ports, fewer partitions (as every test), no StatsD.
fn with_test_deployment(
    mut env: BTreeMap<String, String>,
    settings: &Settings,
    http: SocketAddr,
) -> BTreeMap<String, String> {
    let test = [
        (
            "HERALD_DATABASE_URL",
            settings.store.database_url.expose().to_owned(),
        ),
        ("HERALD_AMQP_URL", amqp_url()),
        ("HERALD_QUEUE__PREFIX", settings.queue.prefix.clone()),
        (
            "HERALD_QUEUE__PARTITIONS",
            settings.queue.partitions.to_string(),
        ),
        ("HERALD_SECRET", crate::common::TEST_SECRET.to_owned()),
        ("HERALD_HTTP_ADDR", http.to_string()),
        ("HERALD_METRICS__PROMETHEUS_ADDR", "127.0.0.1:0".to_owned()),
        ("HERALD_STATSD_ADDR", String::new()),
    ];
    for (var, value) in test {
        env.insert(var.to_owned(), value);
    }
    env
}

/// `argv` (a unit's or a container's command line, the installed path made this build's) in
/// exactly `env`.
fn command(argv: &[String], env: &BTreeMap<String, String>) -> Command {
    let program = match argv[0].as_str() {
        INSTALLED | "herald" => HERALD,
        other => panic!("unexpected program {other}"),
    };
    let mut command = Command::new(program);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run_to_success(argv: &[String], env: &BTreeMap<String, String>) {
    let out = timeout(PATIENCE, command(argv, env).output())
        .await
        .expect("it ends")
        .expect("it runs");
    assert!(
        out.status.success(),
        "{argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `GET path` on `addr` until it answers 200, as a readiness probe does.
async fn wait_ready(addr: SocketAddr, path: &str, node: &mut Child) {
    let http = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    wait_until(&format!("{url} to answer 200"), PATIENCE, || {
        let (http, url) = (http.clone(), url.clone());
        let exited = node.try_wait().unwrap();
        async move {
            assert!(exited.is_none(), "the node exited: {exited:?}");
            let status = http.get(&url).send().await.ok()?.status();
            (status == 200).then_some(())
        }
    })
    .await;
}

/// Sends `signal` as the service manager would and waits up to `grace` for a clean exit.
async fn stop_within(node: &mut Child, signal: i32, grace: Duration) {
    let pid = node.id().expect("running") as i32;
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(pid, signal) };
    let status = timeout(grace, node.wait())
        .await
        .expect("the node drained within the stop timeout")
        .unwrap();
    assert!(status.success(), "the drain ended in {status:?}");
}

#[tokio::test]
async fn the_systemd_unit_checks_starts_and_drains_each_role() {
    let unit_text = repo_file("deploy/systemd/herald@.service");
    let unit = parse_unit(&unit_text);
    let get = |section: &str, key: &str| -> Vec<String> {
        unit.get(&(section.to_owned(), key.to_owned()))
            .cloned()
            .unwrap_or_default()
    };
    let one = |section: &str, key: &str| -> String {
        let values = get(section, key);
        assert_eq!(values.len(), 1, "{section}.{key}: {values:?}");
        values[0].clone()
    };
    let argv =
        |line: String| -> Vec<String> { line.split_whitespace().map(str::to_owned).collect() };
    let check = argv(one("Service", "ExecStartPre"));
    let serve = argv(one("Service", "ExecStart"));
    assert_eq!(check[1..], ["check"], "{check:?}");
    assert_eq!(serve[1..], ["serve"], "{serve:?}");
    assert_eq!(one("Service", "KillSignal"), "SIGTERM");
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert_eq!(
        get("Service", "EnvironmentFile"),
        ["/etc/herald/herald.env", "-/etc/herald/%i.env"]
    );
    let stop_secs: u64 = one("Service", "TimeoutStopSec").parse().expect("seconds");

    // systemd's own reading, where systemd is installed: any complaint fails the test.
    if let Ok(verify) = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .await
        && verify.status.success()
    {
        let dir = std::env::temp_dir().join(format!("herald-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("herald@api.service");
        std::fs::write(&path, unit_text.replace(INSTALLED, HERALD)).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze: {said}"
        );
    }

    let shared: BTreeMap<String, String> = parse_env_file(&repo_file("deploy/systemd/herald.env"))
        .into_iter()
        .collect();
    let shutdown_ms: u64 = shared["HERALD_NODE__SHUTDOWN_TIMEOUT_MS"].parse().unwrap();
    assert!(
        stop_secs * 1000 > shutdown_ms,
        "systemd kills after {stop_secs} s, before the {shutdown_ms} ms drain ends"
    );
    assert_eq!(
        shared["HERALD_SECRET"], "",
        "the example never ships a usable secret"
    );

    let settings = test_settings();
    let _cleanup = DropsDeployment(settings.clone());
    let mut nodes = Vec::new();
    for role in ["api", "worker", "socket"] {
        let mut env = shared.clone();
        env.extend(parse_env_file(&repo_file(&format!(
            "deploy/systemd/{role}.env"
        ))));
        env.insert("HERALD_NODE__NAME".into(), format!("test-{role}"));
        assert_eq!(env["HERALD_NODE__ROLES"], role);
        let env = with_test_deployment(env, &settings, free_addr().await);
        if role == "api" {
            // README: `herald migrate` once per upgrade, before the new version starts.
            run_to_success(&["herald".into(), "migrate".into()], &env).await;
        }
        run_to_success(&check, &env).await;
        let mut node = command(&serve, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http: SocketAddr = env["HERALD_HTTP_ADDR"].parse().unwrap();
        wait_ready(http, "/readyz", &mut node).await;
        nodes.push(node);
    }
    for node in &mut nodes {
        stop_within(node, libc::SIGTERM, Duration::from_secs(stop_secs)).await;
    }
}

#[tokio::test]
async fn the_kubernetes_manifest_migrates_then_readies_and_drains_each_role() {
    let docs: Vec<Value> =
        serde_yaml_ng::Deserializer::from_str(&repo_file("deploy/kubernetes/herald.yaml"))
            .map(|doc| serde::Deserialize::deserialize(doc).expect("valid YAML"))
            .collect();
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let config = kind("ConfigMap").next().expect("a ConfigMap");
    let config_name = config["metadata"]["name"].as_str().unwrap();
    let mut shared: BTreeMap<String, String> = config["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().expect("ConfigMap values are strings").to_owned(),
            )
        })
        .collect();
    // The Secret's keys (made by kubectl create secret, README): this test's values stand in.
    shared.insert("HERALD_SECRET".into(), String::new());
    let shutdown_ms: u64 = shared["HERALD_NODE__SHUTDOWN_TIMEOUT_MS"].parse().unwrap();

    let settings = test_settings();
    let _cleanup = DropsDeployment(settings.clone());
    let container_env = |container: &Value, pod: &str| -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for from in container["envFrom"].as_array().unwrap() {
            if let Some(name) = from["configMapRef"]["name"].as_str() {
                assert_eq!(name, config_name);
                env.extend(shared.clone());
            } else {
                assert!(from["secretRef"]["name"].is_string(), "{from}");
            }
        }
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_owned();
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod.to_owned(),
                None => var["value"].as_str().unwrap().to_owned(),
                Some(other) => panic!("fieldRef {other}"),
            };
            env.insert(name, value);
        }
        env
    };

    let job = kind("Job").next().expect("the migrate Job");
    let migrate = &job["spec"]["template"]["spec"]["containers"][0];
    let migrate_env = with_test_deployment(
        container_env(migrate, "migrate"),
        &settings,
        free_addr().await,
    );
    let migrate_args: Vec<String> = std::iter::once("herald".to_owned())
        .chain(
            migrate["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        )
        .collect();
    run_to_success(&migrate_args, &migrate_env).await;

    let mut roles = Vec::new();
    let mut nodes = Vec::new();
    for deployment in kind("Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(args[..2], ["serve", "--roles"], "{name}: {args:?}");
        roles.push(args[2].clone());
        // The probe reaches the port the node listens on.
        let probe = &container["readinessProbe"]["httpGet"];
        let port_name = probe["port"].as_str().unwrap();
        let port = container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == port_name)
            .expect("the probe's named port")["containerPort"]
            .as_u64()
            .unwrap();
        let env = container_env(container, &format!("{name}-0"));
        let listen: SocketAddr = env["HERALD_HTTP_ADDR"].parse().unwrap();
        assert_eq!(u64::from(listen.port()), port, "{name}");
        assert_eq!(probe["path"], "/readyz", "{name}");
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
        // The grace period covers the preStop pause and the whole drain.
        let grace = pod["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("a grace period");
        let pre_stop: u64 = container["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .map(|c| c[1].as_str().unwrap().parse().unwrap())
            .unwrap_or(0);
        assert!(
            grace * 1000 > pre_stop * 1000 + shutdown_ms,
            "{name}: {grace} s of grace for a {pre_stop} s preStop and a {shutdown_ms} ms drain"
        );
        let http = free_addr().await;
        let env = with_test_deployment(env, &settings, http);
        let argv: Vec<String> = std::iter::once("herald".to_owned()).chain(args).collect();
        let mut node = command(&argv, &env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_ready(http, probe["path"].as_str().unwrap(), &mut node).await;
        nodes.push((node, grace));
    }
    roles.sort();
    assert_eq!(roles, ["api", "socket", "worker"]);
    for (node, grace) in &mut nodes {
        stop_within(node, libc::SIGTERM, Duration::from_secs(*grace)).await;
    }
}

#[tokio::test]
async fn the_container_healthcheck_passes_on_a_ready_node_and_fails_on_a_stopped_one() {
    let dockerfile = repo_file("Dockerfile");
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("the Dockerfile has a HEALTHCHECK");
    let json = &line[line.find("CMD ").expect("CMD") + 4..];
    let argv: Vec<String> = serde_json::from_str(json).expect("CMD in exec form");
    let compose: Value = serde_yaml_ng::from_str(&repo_file("docker-compose.yml")).unwrap();
    let compose_test: Vec<String> =
        serde_json::from_value(compose["services"]["herald"]["healthcheck"]["test"].clone())
            .expect("the compose service's healthcheck");
    assert_eq!(compose_test[0], "CMD");
    assert_eq!(compose_test[1..], argv[..], "one healthcheck for both");

    let mut app = crate::common::spawn_app().await;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "HERALD_DATABASE_URL".into(),
        app.settings.store.database_url.expose().into(),
    );
    env.insert("HERALD_AMQP_URL".into(), amqp_url());
    env.insert(
        "HERALD_QUEUE__PREFIX".into(),
        app.settings.queue.prefix.clone(),
    );
    env.insert(
        "HERALD_QUEUE__PARTITIONS".into(),
        app.settings.queue.partitions.to_string(),
    );
    env.insert("HERALD_SECRET".into(), crate::common::TEST_SECRET.into());
    env.insert("HERALD_HTTP_ADDR".into(), app.addr.to_string());
    env.insert("HERALD_STATSD_ADDR".into(), String::new());
    run_to_success(&argv, &env).await;
    app.stop().await;
    let out = command(&argv, &env).output().await.unwrap();
    assert!(!out.status.success(), "healthy with the node stopped");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("FAIL  serving"), "{said}");
}
