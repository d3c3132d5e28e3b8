//! Secrets in the configuration (the admin token, the Redis URL with its password, the S3
//! secret) and the redaction of passwords from URLs for logs and errors.

use serde::Deserialize;

/// A setting that must never reach a log, an error message or `Debug` output (the admin
/// token, the Redis URL with its password, the S3 secret): `Debug` prints `Secret(***)`, and
/// the value is read only through [`Secret::expose`], so every use is visible in review.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// A URL (or a comma-separated list of them) with each password replaced by `***`, for logs
/// and error messages: `redis://user:pw@host:6379/0` → `redis://user:***@host:6379/0`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_string();
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    let hidden = if userinfo.contains(':') { ":***" } else { "" };
                    format!("{scheme}://{user}{hidden}@{host}{tail}")
                }
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` with the password of every URL in `urls` replaced by `***`: for error messages from
/// code that quotes a URL whole.
pub fn redact_passwords_in(text: &str, urls: &str) -> String {
    let mut text = text.to_string();
    for url in urls.split(',') {
        let password = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split(['/', '?', '#']).next())
            .and_then(|authority| authority.rsplit_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password);
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            text = text.replace(password, "***");
        }
    }
    text
}
