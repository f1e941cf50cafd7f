//! The OpenAPI document as a live node serves it: every documented operation exists with its
//! method, what it answers a caller without credentials is documented, as the JSON error body,
//! and a method a path does not have is a 405 with that body too.

use crate::common::spawn_app_with;
use herald::config::Secret;
use herald::webpush::VapidKey;
use serde_json::Value;

#[tokio::test]
async fn every_documented_operation_is_served_and_answers_as_documented() {
    // With Web Push on, so its routes answer as they do where it is used.
    let app = spawn_app_with(|s| {
        s.webpush.vapid_private_key = Some(Secret::new(VapidKey::generate().private_base64()));
        s.webpush.subject = "mailto:ops@herald.test".into();
    })
    .await;
    let r = app
        .http
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let document: Value = r.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = document["paths"].as_object().unwrap();
    assert!(paths.len() >= 14, "{}", paths.len());
    let mut checked = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let url = app.url(&path.replace("{id}", "x").replace("{user_id}", "x"));
            let request = match method.as_str() {
                "get" => app.http.get(&url),
                "post" => app.http.post(&url).body("{}"),
                "delete" => app.http.delete(&url),
                other => panic!("{other} {path}: an unexpected method"),
            };
            let r = request.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert!(
                operation["responses"][status.to_string()].is_object(),
                "{method} {path}: {status} is not documented ({body})"
            );
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            if secured {
                assert_eq!(status, 401, "{method} {path} without credentials: {body}");
                assert_eq!(body["error"]["code"], "unauthorized", "{method} {path}");
            } else {
                assert_eq!(status, 200, "{method} {path}: {body}");
            }
            checked += 1;
        }
        // A method no path has: 405, the JSON error body, and the methods it has.
        let url = app.url(&path.replace("{id}", "x").replace("{user_id}", "x"));
        let r = app.http.put(&url).send().await.unwrap();
        assert_eq!(r.status(), 405, "PUT {path}");
        let allow = r.headers()["allow"].to_str().unwrap().to_lowercase();
        for method in item.as_object().unwrap().keys() {
            assert!(allow.contains(method.as_str()), "{path}: Allow {allow}");
        }
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed", "PUT {path}");
    }
    assert!(checked >= 14, "{checked}");
}
