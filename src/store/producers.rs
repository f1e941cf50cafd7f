//! Producers and their API keys. A key is shown once, at creation; only its SHA-256 is stored.

use super::{Error, Store};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// A backend service allowed to enqueue events.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Producer {
    /// Database id.
    pub id: i64,
    /// Unique name, e.g. `billing`.
    pub name: String,
}

/// A producer's API key in clear text; exists only between creation and printing.
pub struct ApiKey(String);

impl ApiKey {
    /// A new random key: `hk_` and 256 random bits, base64url.
    ///
    /// # Panics
    /// If the operating system has no random source (an invariant of every supported platform).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        Self(format!("hk_{}", URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The key, to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest stored and looked up.
    pub fn hash(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }
}

impl Store {
    /// Creates a producer with a new key.
    ///
    /// # Errors
    /// The name is taken, or the insert failed.
    pub async fn create_producer(&self, name: &str) -> Result<(Producer, ApiKey), Error> {
        let key = ApiKey::generate();
        let hash = ApiKey::hash(key.expose());
        let producer = sqlx::query_as::<_, Producer>(
            "INSERT INTO producers (name, key_hash) VALUES ($1, $2)
             ON CONFLICT (name) DO NOTHING RETURNING id, name",
        )
        .bind(name)
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::query("create producer"))?
        .ok_or_else(|| Error::Conflict(format!("producer {name}")))?;
        Ok((producer, key))
    }

    /// Gives an existing producer a new key (the old one stops working); `None` if there is no such
    /// producer.
    ///
    /// # Errors
    /// The update failed.
    pub async fn rotate_producer_key(
        &self,
        name: &str,
    ) -> Result<Option<(Producer, ApiKey)>, Error> {
        let key = ApiKey::generate();
        let hash = ApiKey::hash(key.expose());
        let producer = sqlx::query_as::<_, Producer>(
            "UPDATE producers SET key_hash = $2 WHERE name = $1 RETURNING id, name",
        )
        .bind(name)
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::query("rotate producer key"))?;
        Ok(producer.map(|p| (p, key)))
    }

    /// The producer named `name`, created with a key nobody sees when missing (for the demo, which
    /// enqueues as `demo` without a key).
    ///
    /// # Errors
    /// The queries failed.
    pub async fn ensure_producer(&self, name: &str) -> Result<Producer, Error> {
        match self.create_producer(name).await {
            Ok((producer, _unseen_key)) => Ok(producer),
            Err(Error::Conflict(_)) => {
                sqlx::query_as::<_, Producer>("SELECT id, name FROM producers WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(Error::query("find producer"))
            }
            Err(other) => Err(other),
        }
    }

    /// The producer owning the key with this digest.
    ///
    /// # Errors
    /// The query failed.
    pub async fn producer_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<Producer>, Error> {
        sqlx::query_as::<_, Producer>("SELECT id, name FROM producers WHERE key_hash = $1")
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::query("find producer"))
    }

    /// The producer owning the key with this digest, if it has the admin role.
    ///
    /// # Errors
    /// The query failed.
    pub async fn admin_by_key_hash(&self, hash: &[u8; 32]) -> Result<Option<Producer>, Error> {
        sqlx::query_as::<_, Producer>(
            "SELECT id, name FROM producers WHERE key_hash = $1 AND admin",
        )
        .bind(&hash[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::query("find admin"))
    }

    /// Grants (or revokes) the admin role: an admin key may list, inspect and replay every
    /// producer's events. `None` if there is no such producer.
    ///
    /// # Errors
    /// The update failed.
    pub async fn set_producer_admin(
        &self,
        name: &str,
        admin: bool,
    ) -> Result<Option<Producer>, Error> {
        sqlx::query_as::<_, Producer>(
            "UPDATE producers SET admin = $2 WHERE name = $1 RETURNING id, name",
        )
        .bind(name)
        .bind(admin)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::query("set producer role"))
    }

    /// All producers by name, each with whether it is an admin.
    ///
    /// # Errors
    /// The query failed.
    pub async fn list_producer_roles(&self) -> Result<Vec<(Producer, bool)>, Error> {
        let rows: Vec<(i64, String, bool)> =
            sqlx::query_as("SELECT id, name, admin FROM producers ORDER BY name")
                .fetch_all(&self.pool)
                .await
                .map_err(Error::query("list producers"))?;
        Ok(rows
            .into_iter()
            .map(|(id, name, admin)| (Producer { id, name }, admin))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hash_stably() {
        let (a, b) = (ApiKey::generate(), ApiKey::generate());
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("hk_"));
        assert_eq!(ApiKey::hash(a.expose()), ApiKey::hash(a.expose()));
        assert_ne!(ApiKey::hash(a.expose()), ApiKey::hash(b.expose()));
    }
}
