//! Socket tokens: a leaf module, used by the API (which signs) and the socket (which verifies); it
//! depends on neither. A backend asks Herald for one (API or CLI) and hands it to its client, which
//! presents it when connecting. A token names one user and an expiry, signed with HMAC-SHA256:
//! `base64url({"u":user,"e":expiry_unix_secs}) "." base64url(mac)`.

use crate::event::UserId;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Used when no secret is configured; `herald serve` warns loudly when it falls back to this.
pub const DEVELOPMENT_SECRET: &str = "herald-development-secret-do-not-use-in-production";

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the token's shape.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    u: UserId,
    e: u64,
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    /// Shared: every socket's state holds a signer, and a clone must not copy the key.
    secret: std::sync::Arc<[u8]>,
}

impl TokenSigner {
    /// A signer for `secret`.
    pub fn new(secret: &str) -> Self {
        Self {
            secret: secret.as_bytes().into(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!())
    }

    /// A token for `user` valid until `expires_at` (Unix seconds).
    pub fn sign(&self, user: &UserId, expires_at: u64) -> String {
        let claims = Claims {
            u: user.clone(),
            e: expires_at,
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{signature}")
    }

    /// The user a token names, if it is genuine and unexpired at `now` (Unix seconds).
    ///
    /// # Errors
    /// Malformed, forged or expired.
    pub fn verify(&self, token: &str, now: u64) -> Result<UserId, TokenError> {
        let (body, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(body)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(TokenError::Malformed)?;
        if claims.e <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims.u)
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_forgery_and_expiry() {
        let signer = TokenSigner::new("k1");
        let user = UserId::parse("42").unwrap();
        let token = signer.sign(&user, 1_000);
        assert_eq!(signer.verify(&token, 999), Ok(user.clone()));
        assert_eq!(signer.verify(&token, 1_000), Err(TokenError::Expired));
        assert_eq!(
            TokenSigner::new("k2").verify(&token, 0),
            Err(TokenError::BadSignature)
        );
        assert_eq!(signer.verify("nonsense", 0), Err(TokenError::Malformed));
        // Changing the body (another user) breaks the signature.
        let forged = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"u":"1","e":5000}"#),
            token.split_once('.').unwrap().1
        );
        assert_eq!(signer.verify(&forged, 0), Err(TokenError::BadSignature));
    }
}
