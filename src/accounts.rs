//! Accounts (SPEC §9): customers that own keys and share one monthly limit across them, so
//! nobody multiplies a plan by creating keys. The operations behind `/admin/accounts`.

use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use crate::auth::new_id;
use crate::clock::Clock;
use crate::events::Event;
use crate::keys::{AdminError, KeyService, KeyView};
use crate::quota::{Day, Period};
use crate::store::lease::Quota;
use crate::store::{AccountRecord, AccountStatus, AccountUpdate, Store, rfc3339};

/// Longest email accepted (RFC 5321's path limit).
const MAX_EMAIL: usize = 254;

/// An account as the admin API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AccountView {
    pub id: String,
    pub email: String,
    pub name: String,
    pub plan: String,
    pub monthly_limit: Option<u64>,
    pub status: AccountStatus,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&AccountRecord> for AccountView {
    fn from(r: &AccountRecord) -> Self {
        Self {
            id: r.id.clone(),
            email: r.email.clone(),
            name: r.name.clone(),
            plan: r.plan.clone(),
            monthly_limit: r.monthly_limit,
            status: r.status,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CreateAccount {
    pub email: String,
    pub name: String,
    /// `None`: the default plan.
    pub plan: Option<String>,
}

/// A change requested through `PATCH`: closing is `DELETE`'s, not a status to set.
#[derive(Debug, Clone, Default)]
pub struct ChangeAccount {
    pub name: Option<String>,
    pub plan: Option<String>,
    pub status: Option<AccountStatus>,
}

pub struct AccountService {
    store: Arc<dyn Store>,
    quota: Arc<Quota>,
    keys: Arc<KeyService>,
    clock: Arc<dyn Clock>,
}

/// The email as stored: trimmed and lowercased, or why it is not an address.
pub fn normalize_email(email: &str) -> Result<String, AdminError> {
    let email = email.trim().to_lowercase();
    let well_formed = email.len() <= MAX_EMAIL
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && email.matches('@').count() == 1
        && !email.starts_with('.')
        && !email.ends_with('.')
        && email.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if well_formed {
        Ok(email)
    } else {
        Err(AdminError::field(
            "email",
            "must be an email address (name@domain)",
        ))
    }
}

fn check_name(name: &str) -> Result<String, AdminError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(AdminError::field("name", "must be 1 to 200 characters"));
    }
    Ok(name.to_string())
}

impl AccountService {
    pub fn new(
        store: Arc<dyn Store>,
        quota: Arc<Quota>,
        keys: Arc<KeyService>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            quota,
            keys,
            clock,
        }
    }

    fn now(&self) -> std::time::SystemTime {
        crate::clock::to_second(self.clock.now())
    }

    pub async fn create(&self, req: CreateAccount) -> Result<AccountView, AdminError> {
        let email = normalize_email(&req.email)?;
        let name = check_name(&req.name)?;
        let plan = req
            .plan
            .unwrap_or_else(|| self.keys.default_plan().to_string());
        let monthly_limit = self.keys.plan(&plan)?.monthly_limit;
        let now = self.now();
        let record = AccountRecord {
            id: new_id("acct"),
            email: email.clone(),
            name,
            plan,
            monthly_limit,
            status: AccountStatus::Active,
            created_at: now,
            updated_at: now,
        };
        if !self.store.insert_account(record.clone()).await? {
            return Err(AdminError::EmailTaken(email));
        }
        let view = AccountView::from(&record);
        self.keys
            .tell(|now| Event::once("account.created", &view.id, json!(view), now))
            .await;
        Ok(view)
    }

    /// A page of accounts in creation order after the cursor, and the next page's cursor.
    pub async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<AccountView>, Option<String>), AdminError> {
        let accounts = self
            .store
            .list_accounts(cursor, limit)
            .await?
            .ok_or_else(crate::keys::unknown_cursor)?;
        let next = crate::keys::next_cursor(&accounts, limit, |a| &a.id);
        Ok((accounts.iter().map(AccountView::from).collect(), next))
    }

    /// The account, its usage this month (all its keys together) and its keys.
    pub async fn show(
        &self,
        id: &str,
    ) -> Result<(AccountView, Period, u64, Vec<KeyView>), AdminError> {
        let record = self.find(id).await?;
        let period = Period::containing(self.clock.now());
        let used = self.quota.usage(&record.id, period).await?;
        let keys = self.keys.of_account(&record).await?;
        Ok((AccountView::from(&record), period, used, keys))
    }

    /// The account's calls (all its keys) per UTC day from `from` to `to`.
    pub async fn history(
        &self,
        id: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(Day, u64)>, AdminError> {
        let record = self.find(id).await?;
        Ok(self.quota.history(&record.id, from, to).await?)
    }

    pub async fn change(&self, id: &str, change: ChangeAccount) -> Result<AccountView, AdminError> {
        let record = self.find(id).await?;
        if record.status == AccountStatus::Closed {
            return Err(AdminError::AccountClosed(id.to_string()));
        }
        if change.status == Some(AccountStatus::Closed) {
            return Err(AdminError::field(
                "status",
                "an account is closed with DELETE, which also revokes its keys",
            ));
        }
        let monthly_limit = match &change.plan {
            Some(plan) => Some(self.keys.plan(plan)?.monthly_limit),
            None => None,
        };
        let update = AccountUpdate {
            name: change.name.as_deref().map(check_name).transpose()?,
            plan: change.plan,
            monthly_limit,
            status: change.status,
        };
        let updated = self.update(id, update).await?;
        // Closed between our read and the store's atomic update: the store kept it closed.
        if updated.status == AccountStatus::Closed {
            return Err(AdminError::AccountClosed(id.to_string()));
        }
        Ok(AccountView::from(&updated))
    }

    /// Closes the account for good and revokes every key it owns.
    pub async fn close(&self, id: &str) -> Result<AccountView, AdminError> {
        self.find(id).await?;
        let update = AccountUpdate {
            status: Some(AccountStatus::Closed),
            ..Default::default()
        };
        let closed = self.update(id, update).await?;
        for key in self.store.keys_of_account(id).await? {
            match self.keys.revoke(&key.id).await {
                Ok(_) | Err(AdminError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(AccountView::from(&closed))
    }

    /// Applies `update`, then makes every node forget the account's keys: the cache holds
    /// each key together with its account.
    async fn update(&self, id: &str, update: AccountUpdate) -> Result<AccountRecord, AdminError> {
        let updated = self
            .store
            .update_account(id, update, self.now())
            .await?
            .ok_or_else(|| AdminError::AccountNotFound(id.to_string()))?;
        // Both secrets of each key: one in its rotation grace is cached under the old one too.
        for key in self.store.keys_of_account(id).await? {
            for digest in std::iter::once(&key.digest).chain(&key.previous_digest) {
                self.keys.forget(digest).await;
            }
        }
        Ok(updated)
    }

    async fn find(&self, id: &str) -> Result<AccountRecord, AdminError> {
        self.store
            .account_by_id(id)
            .await?
            .ok_or_else(|| AdminError::AccountNotFound(id.to_string()))
    }
}
