//! Invite links (SPEC §9, §10): `POST /admin/accounts` answers with a one-time link to the
//! portal's set-password page, valid 7 days. Only the token's digest is stored.

use std::sync::Arc;

use crate::clock::Clock;
use crate::portal::core::{INVITE_VALID, digest, new_token};
use crate::store::StoreError;
use crate::store::portal::{Invite, PortalStore};

pub struct Invites {
    store: Arc<dyn PortalStore>,
    /// The portal's address as users reach it, without a trailing slash.
    base_url: String,
    clock: Arc<dyn Clock>,
}

impl Invites {
    pub fn new(store: Arc<dyn PortalStore>, base_url: String, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            base_url,
            clock,
        }
    }

    /// A new invite link for the account (earlier ones keep working until used or expired).
    pub async fn issue(&self, account_id: &str) -> Result<String, StoreError> {
        let token = new_token();
        let invite = Invite {
            account_id: account_id.to_string(),
            expires_at: crate::clock::to_second(self.clock.now()) + INVITE_VALID,
            used: false,
        };
        self.store.insert_invite(&digest(&token), invite).await?;
        Ok(format!("{}/invite/{token}", self.base_url))
    }
}
