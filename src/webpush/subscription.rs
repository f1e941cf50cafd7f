//! A push subscription as a browser gives it (`PushSubscription.toJSON()`), checked before it is
//! stored: an endpoint this node may send to ([`super::guard`]) and keys a payload can be
//! encrypted to.

use super::guard::{EndpointError, EndpointPolicy};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use utoipa::ToSchema;

/// What `PushManager.subscribe()` returns, as its `toJSON()` writes it. Other members a browser
/// adds are ignored.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SubscriptionInput {
    /// The push service's URL for this browser: `https:`, on a push service this node sends to.
    #[schema(max_length = 2048, pattern = "^https?://")]
    pub endpoint: String,
    /// When the push service will end the subscription (Unix ms), if it says; informative.
    #[serde(rename = "expirationTime")]
    #[schema(value_type = Option<i64>)]
    pub expiration_time: Option<serde_json::Value>,
    /// The browser's keys.
    pub keys: SubscriptionKeys,
}

/// A subscription's keys (RFC 8291), base64url.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SubscriptionKeys {
    /// The browser's P-256 public key, uncompressed (65 bytes).
    #[schema(min_length = 87, max_length = 88, pattern = "^[A-Za-z0-9_+/-]+=?$")]
    pub p256dh: String,
    /// The browser's authentication secret (16 bytes).
    #[schema(min_length = 22, max_length = 24, pattern = "^[A-Za-z0-9_+/-]+={0,2}$")]
    pub auth: String,
}

/// A subscription fit to store.
#[derive(Debug)]
pub struct CheckedSubscription {
    /// The endpoint, as given.
    pub endpoint: String,
    /// The public key, 65 bytes on the curve.
    pub p256dh: Vec<u8>,
    /// The auth secret, 16 bytes.
    pub auth: Vec<u8>,
}

/// Why a subscription was refused (a 422 says it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The endpoint may not be sent to.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// `keys.p256dh` is not a P-256 public key.
    #[error("keys.p256dh must be an uncompressed P-256 public key (65 bytes, base64url)")]
    PublicKey,
    /// `keys.auth` is not 16 bytes.
    #[error("keys.auth must be 16 bytes, base64url")]
    Auth,
}

impl SubscriptionInput {
    /// The subscription, if this node can send to it.
    ///
    /// # Errors
    /// Its endpoint or keys are refused.
    pub fn check(self, policy: &EndpointPolicy) -> Result<CheckedSubscription, SubscriptionError> {
        policy.check_endpoint(&self.endpoint)?;
        let p256dh = decode(&self.keys.p256dh).ok_or(SubscriptionError::PublicKey)?;
        if p256dh.len() != 65 || p256::PublicKey::from_sec1_bytes(&p256dh).is_err() {
            return Err(SubscriptionError::PublicKey);
        }
        let auth = decode(&self.keys.auth).ok_or(SubscriptionError::Auth)?;
        if auth.len() != 16 {
            return Err(SubscriptionError::Auth);
        }
        Ok(CheckedSubscription {
            endpoint: self.endpoint,
            p256dh,
            auth,
        })
    }
}

/// Base64url as browsers write it (unpadded); padded and standard base64 are taken too.
fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim().trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::sec1::ToEncodedPoint;

    fn policy() -> EndpointPolicy {
        EndpointPolicy {
            hosts: vec!["fcm.googleapis.com".into()],
            allow_private: false,
        }
    }

    fn input(endpoint: &str, p256dh: &str, auth: &str) -> SubscriptionInput {
        serde_json::from_value(serde_json::json!({
            "endpoint": endpoint, "expirationTime": null,
            "keys": { "p256dh": p256dh, "auth": auth },
        }))
        .unwrap()
    }

    #[test]
    fn keys_of_the_wrong_length_or_off_the_curve_are_refused() {
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let public = secret.public_key().to_encoded_point(false);
        let good_key = URL_SAFE_NO_PAD.encode(public.as_bytes());
        let good_auth = URL_SAFE_NO_PAD.encode([1u8; 16]);
        let endpoint = "https://fcm.googleapis.com/fcm/send/abc";
        assert!(
            input(endpoint, &good_key, &good_auth)
                .check(&policy())
                .is_ok()
        );

        let compressed =
            URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(true).as_bytes());
        let mut off_curve = public.as_bytes().to_vec();
        off_curve[64] ^= 1;
        for bad in [
            compressed,
            URL_SAFE_NO_PAD.encode(off_curve),
            "!!".into(),
            String::new(),
        ] {
            assert_eq!(
                input(endpoint, &bad, &good_auth)
                    .check(&policy())
                    .unwrap_err(),
                SubscriptionError::PublicKey
            );
        }
        for bad in [
            URL_SAFE_NO_PAD.encode([1u8; 15]),
            URL_SAFE_NO_PAD.encode([1u8; 32]),
        ] {
            assert_eq!(
                input(endpoint, &good_key, &bad)
                    .check(&policy())
                    .unwrap_err(),
                SubscriptionError::Auth
            );
        }
        assert!(matches!(
            input("http://fcm.googleapis.com/x", &good_key, &good_auth).check(&policy()),
            Err(SubscriptionError::Endpoint(EndpointError::NotHttps))
        ));
    }
}
