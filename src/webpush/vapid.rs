//! VAPID (RFC 8292): the sender's P-256 key, and the ES256 token that identifies it to a push
//! service. The signature is p256's ECDSA; what is written here is the JWT around it (a header, the
//! `aud`/`exp`/`sub` claims, base64url), which is all a VAPID token is.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};

/// The header of every VAPID token: ES256, fixed.
const JWT_HEADER: &str = r#"{"typ":"JWT","alg":"ES256"}"#;

/// Why a VAPID key was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not unpadded base64url.
    #[error("the VAPID private key is not base64url")]
    Encoding,
    /// Not a P-256 private scalar (32 bytes, nonzero, below the group order).
    #[error("the VAPID private key is not a P-256 private key (32 bytes in base64url)")]
    Scalar,
}

/// The sender's VAPID key pair.
#[derive(Clone)]
pub struct VapidKey {
    signing: SigningKey,
    /// The public key as `applicationServerKey` takes it: uncompressed, base64url.
    public: String,
}

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl VapidKey {
    /// The key `encoded` holds: a P-256 private scalar, 32 bytes, base64url (padding tolerated).
    ///
    /// # Errors
    /// Not base64url, or not a valid scalar.
    pub fn from_base64(encoded: &str) -> Result<Self, KeyError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded.trim().trim_end_matches('='))
            .map_err(|_| KeyError::Encoding)?;
        if bytes.len() != 32 {
            return Err(KeyError::Scalar);
        }
        let signing = SigningKey::from_slice(&bytes).map_err(|_| KeyError::Scalar)?;
        Ok(Self::from_signing(signing))
    }

    /// A fresh random key pair.
    ///
    /// # Panics
    /// The operating system has no randomness to give.
    pub fn generate() -> Self {
        loop {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).expect("the OS random source works");
            // All but about 2^-128 of 32-byte strings are valid scalars.
            if let Ok(signing) = SigningKey::from_slice(&bytes) {
                return Self::from_signing(signing);
            }
        }
    }

    fn from_signing(signing: SigningKey) -> Self {
        let point = signing.verifying_key().to_encoded_point(false);
        let public = URL_SAFE_NO_PAD.encode(point.as_bytes());
        Self { signing, public }
    }

    /// The private key, base64url: what `webpush.vapid_private_key` takes.
    pub fn private_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.signing.to_bytes())
    }

    /// The public key, uncompressed and base64url: a page's `applicationServerKey`.
    pub fn public_base64(&self) -> &str {
        &self.public
    }

    /// The `Authorization` header for requests to `audience` (a push service's origin,
    /// `https://host[:port]`), valid until `expires_unix` (RFC 8292 allows at most 24 hours
    /// ahead), naming `subject` as the contact.
    pub fn authorization(&self, audience: &str, subject: &str, expires_unix: u64) -> String {
        let claims = serde_json::json!({ "aud": audience, "exp": expires_unix, "sub": subject });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(JWT_HEADER),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = self.signing.sign(signing_input.as_bytes());
        let token = format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        );
        format!("vapid t={token}, k={}", self.public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::VerifyingKey;
    use p256::ecdsa::signature::Verifier;

    #[test]
    fn a_generated_key_reads_back_and_signs_a_token_its_public_key_verifies() {
        let key = VapidKey::generate();
        let again = VapidKey::from_base64(&key.private_base64()).unwrap();
        assert_eq!(again.public_base64(), key.public_base64());

        let header = key.authorization("https://push.example:8443", "mailto:ops@example.com", 42);
        let (token, k) = header
            .strip_prefix("vapid t=")
            .and_then(|rest| rest.split_once(", k="))
            .unwrap();
        assert_eq!(k, key.public_base64());
        let (input, signature) = token.rsplit_once('.').unwrap();
        let claims = input.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example:8443");
        assert_eq!(claims["exp"], 42);
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        let verifying = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap()).unwrap();
        verifying.verify(input.as_bytes(), &signature).unwrap();
        // A changed claim no longer verifies.
        let forged = input.replace('A', "B");
        assert!(verifying.verify(forged.as_bytes(), &signature).is_err());
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(matches!(
            VapidKey::from_base64("not base64!"),
            Err(KeyError::Encoding)
        ));
        assert!(matches!(
            VapidKey::from_base64("AAAA"),
            Err(KeyError::Scalar)
        ));
        // Zero is not a private key.
        let zero = URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert!(matches!(
            VapidKey::from_base64(&zero),
            Err(KeyError::Scalar)
        ));
    }
}
