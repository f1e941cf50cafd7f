//! Several nodes, one deployment: an api+worker node and two socket nodes, fanning out over RabbitMQ.

use crate::common::{
    PATIENCE, StatsdListener, TcpProxy, counter_sum, spawn_cluster, spawn_cluster_with, spawn_node,
    spawn_unready, wait_until,
};
use serde_json::{Value, json};
use std::time::Duration;

async fn seqs(client: &mut crate::common::WsClient, count: usize) -> Vec<i64> {
    let mut seqs = Vec::new();
    for _ in 0..count {
        seqs.push(client.recv_push().await[4]["seq"].as_i64().unwrap());
    }
    seqs
}

#[tokio::test]
async fn users_on_different_nodes_get_their_own_events_once_per_socket() {
    let (api, node_a, node_b) = spawn_cluster().await;
    let mut alice_a = node_a.connect_joined("alice").await;
    let mut bob_b = node_b.connect_joined("bob").await;
    // Carol has a socket on each node.
    let mut carol_a = node_a.connect_joined("carol").await;
    let mut carol_b = node_b.connect_joined("carol").await;
    for n in 1..=20 {
        for user in ["alice", "bob", "carol"] {
            let r = api
                .post_event(json!({"user_id": user, "data": {"n": n}}))
                .await;
            assert_eq!(r.status(), 202);
        }
    }
    for (client, user) in [
        (&mut alice_a, "alice"),
        (&mut bob_b, "bob"),
        (&mut carol_a, "carol"),
        (&mut carol_b, "carol"),
    ] {
        let mut got = Vec::new();
        for _ in 0..20 {
            let push = client.recv_push().await;
            assert_eq!(
                push[2],
                format!("user:{user}"),
                "only the user's own events"
            );
            got.push(push[4]["data"]["n"].as_i64().unwrap());
        }
        assert_eq!(got, (1..=20).collect::<Vec<i64>>(), "{user}: in order");
    }
    // Once each: a second copy would come before the user's next event.
    for user in ["alice", "bob", "carol"] {
        api.post_sentinel(user).await;
    }
    for client in &mut [alice_a, bob_b, carol_a, carol_b] {
        client.expect_sentinel().await;
    }
}

#[tokio::test]
async fn a_client_that_moves_to_the_other_node_catches_up_without_gap_or_repeat() {
    let (api, node_a, node_b) = spawn_cluster().await;
    let mut client = node_a.connect_joined("dave").await;
    api.post_event(json!({"user_id": "dave"})).await;
    let seen = seqs(&mut client, 1).await[0];
    drop(client);
    // 1,000 events while the client is away.
    for _ in 0..10 {
        let batch: Vec<Value> = (0..100)
            .map(|n| json!({"user_id": "dave", "data": {"n": n}}))
            .collect();
        assert_eq!(api.post_batch(Value::Array(batch)).await.status(), 202);
    }
    let mut client = node_b.connect("dave").await;
    let reply = client.join("user:dave", json!({"last_seq": seen})).await;
    assert_eq!(reply[4]["status"], "ok");
    let caught_up = seqs(&mut client, 1000).await;
    assert_eq!(caught_up, (seen + 1..=seen + 1000).collect::<Vec<i64>>());
    api.post_event(json!({"user_id": "dave", "data": {"live": true}}))
        .await;
    let live = client.recv_push().await;
    assert_eq!(live[4]["seq"].as_i64(), Some(seen + 1001));
    api.post_sentinel("dave").await;
    client.expect_sentinel().await;
}

#[tokio::test]
async fn readiness_names_the_node_and_its_roles() {
    let (api, node_a, _node_b) = spawn_cluster().await;
    let ready: Value = api
        .http
        .get(node_a.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["node"], "socket-a");
    assert_eq!(ready["roles"], "socket");
    assert_eq!(ready["checks"]["rabbitmq_links"]["fanout"], "ok");
    // A socket node in cluster mode serves only with its fan-out queue bound.
    assert_eq!(
        ready["dependencies"]["rabbitmq.fanout"],
        json!({"state": "ok", "required_by": ["socket"]})
    );
    // A socket node serves no producer API.
    let r = api
        .http
        .post(node_a.url("/api/v1/events"))
        .bearer_auth(&api.api_key)
        .json(&json!({"user_id": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn clients_of_a_killed_socket_node_reconnect_elsewhere_and_miss_nothing() {
    let (api, _node_a, node_b) = spawn_cluster().await;
    let mut socket = api.settings.clone();
    socket.node.roles = "socket".parse().unwrap();
    socket.node.name.clear(); // its own: <hostname>-<pid>
    let mut doomed = crate::common::Node::serve(&socket, &[]).await;
    let mut client = crate::common::connect_to(doomed.addr, "erin").await;
    client.join("user:erin", json!({})).await;
    // A producer streams 300 events while the client's node dies under it.
    let total = 300;
    let producer = api.stream_events("erin", total);
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(client.recv_push().await[4]["seq"].as_i64().unwrap());
    }
    doomed.child.kill().await.expect("SIGKILL");
    // The client reads what reached it before the node died, then notices the connection is gone.
    while let Some(frame) = client.next_or_end().await {
        if let Some(seq) = frame[4]["seq"].as_i64() {
            seen.push(seq);
        }
    }
    let last = *seen.last().unwrap();
    let mut client = node_b.connect("erin").await;
    client.join("user:erin", json!({"last_seq": last})).await;
    producer.await.unwrap();
    while seen.last().copied() != Some(total) {
        seen.push(client.recv_push().await[4]["seq"].as_i64().unwrap());
    }
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<i64>>(),
        "every event once, in order"
    );
    api.post_sentinel("erin").await;
    client.expect_sentinel().await;
}

/// A join without `last_seq` answers with the user's last seq, and then pushes exactly what follows
/// it: nothing at or below it, no hole after it. An event committed and broadcast while the join's
/// topic bind is still on its way (here: held by a stalled broker link) must not fall between the
/// two: the join reads where it starts only once its subscription can receive.
#[tokio::test]
async fn a_join_pushes_exactly_what_follows_its_reply_even_when_its_bind_is_slow() {
    let api = spawn_unready(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.roles = "api,worker".parse().unwrap();
        s.node.name = "api-worker".into();
    })
    .await;
    api.wait_ready().await;
    let (proxy, via_proxy) = TcpProxy::in_front_of(api.settings.queue.amqp_url.expose()).await;
    let socket = spawn_node(&api, "socket", "socket-slow-bind", |s| {
        s.queue.amqp_url = via_proxy;
    })
    .await;
    let first = api.enqueue(json!({"user_id": "erin"})).await;
    api.wait_status(&first, "delivered").await;

    let mut client = socket.connect("erin").await;
    proxy.stall();
    client
        .send(json!(["1", "1", "user:erin", "phx_join", {}]))
        .await;
    // Give a join that reads first the time to read seq 1 (one that subscribes first cannot read
    // before the link resumes, whatever this wait).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Committed and broadcast while the bind waits: the node's queue is not bound yet.
    let during = api.enqueue(json!({"user_id": "erin"})).await;
    api.wait_status(&during, "delivered").await;
    proxy.resume();
    let reply = client.recv().await;
    assert_eq!(reply[4]["status"], "ok", "{reply}");
    let last_seq = reply[4]["response"]["last_seq"].as_i64().unwrap();
    api.post_event(json!({"user_id": "erin"})).await;
    let push = client.recv_push().await;
    assert_eq!(
        push[4]["seq"].as_i64(),
        Some(last_seq + 1),
        "the first push follows the reply's last_seq {last_seq}: {push}"
    );
    api.post_sentinel("erin").await;
    client.expect_sentinel().await;
}

/// Two api nodes committing one user's events close together can publish them out of seq order
/// (each publishes on its own channel). The user's lane on the worker puts them back in order: a
/// later seq waits (up to `pipeline.reorder_window_ms`) for the one missing, so the socket never
/// has to fill it in from PostgreSQL.
#[tokio::test]
async fn a_users_events_from_two_api_nodes_are_put_back_in_order_by_its_lane() {
    let statsd = StatsdListener::bind().await;
    let a = spawn_unready(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.name = "api-worker-socket".into();
        s.pipeline.reorder_window_ms = 10_000;
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    a.wait_ready().await;
    let (proxy, via_proxy) = TcpProxy::in_front_of(a.settings.queue.amqp_url.expose()).await;
    let b = spawn_node(&a, "api", "api-b", |s| {
        s.queue.amqp_url = via_proxy;
        s.metrics.statsd_addr = String::new();
    })
    .await;
    let mut client = a.connect_joined("fay").await;
    let first = a.enqueue(json!({"user_id": "fay", "data": {"n": 1}})).await;
    a.wait_status(&first, "delivered").await;
    assert_eq!(client.recv_push().await[4]["seq"], 1);
    // Seq 2 is committed on b, whose publish is held; seq 3 on a, published at once.
    proxy.stall();
    let second = b.enqueue(json!({"user_id": "fay", "data": {"n": 2}})).await;
    let third = a.enqueue(json!({"user_id": "fay", "data": {"n": 3}})).await;
    let admin = a.admin_key().await;
    wait_until("seq 3 in work, waiting for seq 2", PATIENCE, || async {
        let (_, stats) = a.get_json("/api/v1/admin/stats", &admin).await;
        (stats["node"]["in_flight"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    assert_eq!(
        a.status_of(&third).await.as_deref(),
        Some("accepted"),
        "3 waits"
    );
    proxy.resume();
    for seq in [2, 3] {
        assert_eq!(client.recv_push().await[4]["seq"], seq);
    }
    a.wait_status(&second, "delivered").await;
    let lines = statsd.lines_through("socket.connections", 2).await;
    assert_eq!(
        counter_sum(&lines, "socket.push.gap_filled"),
        0,
        "no repair at the socket"
    );
    let restored: i64 = lines
        .iter()
        .filter(|l| l.starts_with("pipeline.lane.reorder:") && l.contains("outcome:restored"))
        .filter_map(|l| l.split(['|', ':']).nth(1)?.parse::<i64>().ok())
        .sum();
    assert_eq!(restored, 1, "the lane waited for seq 2");
}

/// The routing keys bound from the deployment's fan-out exchange, per destination queue, as
/// RabbitMQ lists them.
fn fanout_bindings(prefix: &str) -> std::collections::HashMap<String, Vec<String>> {
    let exchange = herald::queue::fanout::exchange_name(prefix);
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_bindings", "-q", "--no-table-headers"])
        .args(["source_name", "destination_name", "routing_key"])
        .output()
        .expect("rabbitmqctl runs");
    let mut bindings: std::collections::HashMap<String, Vec<String>> = Default::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        if let [source, destination, key] = fields[..]
            && source == exchange
        {
            bindings
                .entry(destination.to_owned())
                .or_default()
                .push(key.to_owned());
        }
    }
    bindings
}

/// One bucket for every topic: users of the same bucket are split across both socket nodes, and
/// while events stream to all of them, half the clients leave and rejoin (with their last seq) on
/// the other node, some twice, so buckets are unbound and bound again mid-stream. Every client
/// gets exactly its own user's events (its node receives every user's), in order, each once;
/// each node binds one key. The first node's clients all leave at the first hop, so its bucket is
/// unbound, and bound again when clients come back at the second.
#[tokio::test]
async fn users_of_one_bucket_on_both_nodes_get_their_own_events_through_joins_and_leaves() {
    let (api, node_a, node_b) = spawn_cluster_with(|s| s.pubsub.buckets = 1).await;
    let users: Vec<String> = (0..8).map(|u| format!("b{u}")).collect();
    let nodes = [&node_a, &node_b];
    let mut clients = Vec::new();
    for (u, user) in users.iter().enumerate() {
        clients.push(nodes[u % 2].connect_joined(user).await);
    }
    let bindings = fanout_bindings(&api.settings.queue.prefix);
    assert_eq!(bindings.len(), 2, "one queue per socket node: {bindings:?}");
    assert!(
        bindings.values().all(|keys| keys == &["b0".to_owned()]),
        "one binding per node, the only bucket: {bindings:?}"
    );
    // Events for every user, 40 rounds, while clients move.
    let stream = {
        let users = users.clone();
        let url = api.url("/api/v1/events");
        let key = api.api_key.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for round in 0..40 {
                for user in &users {
                    let r = http
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&json!({"user_id": user, "data": {"round": round}}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 202);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // What each user's clients have pushed so far, in order.
    let mut seen: Vec<Vec<i64>> = vec![Vec::new(); users.len()];
    for hop in 0..3 {
        for (u, user) in users.iter().enumerate() {
            if u % 2 == 1 || (hop == 2 && u % 4 != 0) {
                continue;
            }
            // Take a few pushes, then leave this node and rejoin on the other with the last seq.
            for _ in 0..3 {
                seen[u].push(clients[u].recv_push().await[4]["seq"].as_i64().unwrap());
            }
            let last = *seen[u].last().unwrap();
            let mut moved = nodes[(u + hop + 1) % 2].connect(user).await;
            let reply = moved
                .join(&format!("user:{user}"), json!({"last_seq": last}))
                .await;
            assert_eq!(reply[4]["status"], "ok", "{reply}");
            clients[u] = moved;
        }
    }
    stream.await.expect("the stream finished");
    for user in &users {
        api.post_sentinel(user).await;
    }
    for (u, client) in clients.iter_mut().enumerate() {
        loop {
            let push = client.recv_push().await;
            assert_eq!(
                push[2],
                format!("user:{}", users[u]),
                "another user's event"
            );
            if push[4]["data"] == json!({"sentinel": true}) {
                break;
            }
            seen[u].push(push[4]["seq"].as_i64().unwrap());
        }
        let expected: Vec<i64> = (1..=40).collect();
        assert_eq!(
            seen[u], expected,
            "user {}: every event once, in order",
            users[u]
        );
    }
}

/// A node whose `pubsub.buckets` differs from its deployment's refuses to start, and says which
/// setting to align; the same count starts.
#[tokio::test]
async fn a_node_with_another_bucket_count_is_refused() {
    let (api, _node_a, _node_b) = spawn_cluster_with(|s| s.pubsub.buckets = 4).await;
    let mut settings = api.settings.clone();
    settings.http.addr = "127.0.0.1:0".parse().unwrap();
    settings.node.roles = "socket".parse().unwrap();
    settings.pubsub.buckets = 8;
    let refused = herald::app::App::build(settings.clone()).await;
    let error = refused.err().expect("refused").to_string();
    assert!(
        error.contains("HERALD_PUBSUB__BUCKETS=4"),
        "says what to set: {error}"
    );
    // `herald check` says the same before a start.
    let out = crate::common::herald_command(&settings, &["check"])
        .output()
        .await
        .expect("check runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("FAIL") && l.contains("HERALD_PUBSUB__BUCKETS=4")),
        "{report}"
    );
    settings.pubsub.buckets = 4;
    assert!(
        herald::app::App::build(settings).await.is_ok(),
        "the same count starts"
    );
}

/// A node running the worker and socket roles in cluster mode pushes to its own sockets straight
/// away and still reaches the other socket node's through RabbitMQ; the copy the broker hands back
/// to the node that made it is dropped before any channel sees it (the order guard counts no
/// duplicate), so each socket gets each event once.
#[tokio::test]
async fn a_worker_socket_node_pushes_to_its_own_sockets_and_still_reaches_the_others() {
    let statsd = StatsdListener::bind().await;
    let a = spawn_unready(|s| {
        s.pubsub.mode = herald::config::PubSubMode::Cluster;
        s.node.name = "api-worker-socket".into();
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    a.wait_ready().await;
    let b = spawn_node(&a, "socket", "socket-b", |s| {
        s.metrics.statsd_addr = String::new();
    })
    .await;
    let mut alice_a = a.connect_joined("alice").await;
    let mut alice_b = b.connect_joined("alice").await;
    let mut bob_a = a.connect_joined("bob").await;
    for n in 1..=30 {
        for user in ["alice", "bob"] {
            let r = a
                .post_event(json!({"user_id": user, "data": {"n": n}}))
                .await;
            assert_eq!(r.status(), 202);
        }
    }
    let expected: Vec<i64> = (1..=30).collect();
    assert_eq!(seqs(&mut alice_a, 30).await, expected, "alice on a");
    assert_eq!(seqs(&mut alice_b, 30).await, expected, "alice on b");
    assert_eq!(seqs(&mut bob_a, 30).await, expected, "bob on a");
    for user in ["alice", "bob"] {
        a.post_sentinel(user).await;
    }
    for client in [&mut alice_a, &mut alice_b, &mut bob_a] {
        client.expect_sentinel().await;
    }
    let lines = statsd.lines_through("socket.connections", 2).await;
    assert_eq!(
        counter_sum(&lines, "socket.push.duplicate"),
        0,
        "node a's own broadcasts came back to its channels"
    );
}

/// A worker packs the runs it broadcasts close together into one fan-out message addressed to
/// every bucket they fall in (RabbitMQ's `CC` header): a node bound to only some of those buckets
/// gets the message even when its routing key is another node's bucket, delivers its own users'
/// runs and skips the rest. Users of even buckets are on one socket node and of odd buckets on the
/// other, over 1,024 buckets (each socket's own topic binds one more, anywhere), so nearly every
/// message reaches one of them through `CC` alone. Every client gets exactly
/// its own user's events, in order, once, with nothing for the socket's order guard to repair; and
/// messages did carry several runs (planting a batch of one makes the last assertion fail;
/// planting routing by the first bucket alone starves a node).
#[tokio::test]
async fn runs_broadcast_together_reach_every_node_bound_to_any_of_their_buckets() {
    let statsd = StatsdListener::bind().await;
    let buckets = 1024;
    let (api, node_a, node_b) = spawn_cluster_with(|s| {
        s.pubsub.buckets = buckets;
        s.metrics.statsd_addr = statsd.addr.to_string();
    })
    .await;
    let users: Vec<String> = (0..40).map(|u| format!("cc{u}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        let bucket = herald::event::stable_bucket(&format!("user:{user}"), buckets);
        let node = if bucket.is_multiple_of(2) {
            &node_a
        } else {
            &node_b
        };
        clients.push(node.connect_joined(user).await);
    }
    let bindings = fanout_bindings(&api.settings.queue.prefix);
    assert_eq!(bindings.len(), 2, "one queue per socket node: {bindings:?}");
    // Ten batch requests with an event for every user: each commit makes 40 runs at once.
    for round in 1..=10 {
        let events: Vec<Value> = users
            .iter()
            .map(|user| json!({"user_id": user, "data": {"round": round}}))
            .collect();
        let r = api.post_batch(json!(events)).await;
        assert!(r.status().is_success(), "{}", r.status());
    }
    for (client, user) in clients.iter_mut().zip(&users) {
        let mut got = Vec::new();
        for _ in 0..10 {
            let push = client.recv_push().await;
            assert_eq!(push[2], format!("user:{user}"), "another user's event");
            got.push(push[4]["seq"].as_i64().unwrap());
        }
        assert_eq!(got, (1..=10).collect::<Vec<i64>>(), "{user}: in order");
    }
    for user in &users {
        api.post_sentinel(user).await;
    }
    for client in &mut clients {
        client.expect_sentinel().await;
    }
    let lines = statsd.lines_through("socket.connections", 6).await;
    // The socket's order guard would hide a copy or a reordering from the client: it must have had
    // nothing to repair.
    for repaired in ["socket.push.duplicate", "socket.push.gap_filled"] {
        assert_eq!(counter_sum(&lines, repaired), 0, "{repaired}");
    }
    let most = lines
        .iter()
        .filter_map(|l| l.strip_prefix("pubsub.fanout.broadcasts:"))
        .filter_map(|rest| rest.split('|').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(
        most > 1.0,
        "no fan-out message carried more than one run ({} messages for {} events)",
        counter_sum(&lines, "pubsub.fanout.messages"),
        counter_sum(&lines, "pubsub.fanout.events")
    );
}

/// A socket node binds and consumes on one loop, so a bind the broker never answers (a wedged
/// channel: the connection stays open, nothing comes back) would hold up every broadcast and join
/// behind it for good. It fails within `queue.confirm_timeout_ms` instead, and the loop rebuilds
/// its link.
#[tokio::test]
async fn a_bind_the_broker_never_answers_fails_instead_of_holding_the_node_queue() {
    let mut settings = crate::common::test_settings().queue;
    settings.confirm_timeout_ms = 500;
    let (proxy, via_proxy) = TcpProxy::in_front_of(settings.amqp_url.expose()).await;
    settings.amqp_url = via_proxy;
    let nodes = herald::queue::BrokerNodes::new(&settings);
    let link = herald::queue::fanout::NodeQueue::open(&settings, "wedged", &nodes)
        .await
        .expect("the node queue opens");
    link.bind(1).await.expect("a bind answered");
    proxy.stall();
    let unanswered = tokio::time::timeout(PATIENCE, link.bind(2))
        .await
        .expect("the bind gives up on its own, long before the test's patience");
    assert!(
        matches!(unanswered, Err(herald::queue::Error::NoAnswer(_))),
        "{unanswered:?}"
    );
    let unanswered = tokio::time::timeout(PATIENCE, link.unbind(1))
        .await
        .expect("so does an unbind");
    assert!(unanswered.is_err(), "{unanswered:?}");
    proxy.resume();
}
