//! The portal's pages, rendered on the server with maud (checked at compile time, escaped by
//! default). Every flow works without JavaScript; the one inline script only makes the Copy
//! button copy. The names of fields, buttons and headings are SPEC §10's, for screen readers
//! and for the browser tests.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::keys::KeyView;
use crate::portal::core::GRACES;
use crate::quota::Day;
use crate::store::KeyStatus;

/// Kept small: the whole stylesheet, served at `/style.css` and cached.
pub const STYLE: &str = "\
*{box-sizing:border-box}body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1b1b1f;background:#f6f6f8}\
header{background:#1b1b1f;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:1rem;align-items:center}\
header a{color:#fff}header nav{display:flex;gap:1rem;flex:1}\
main{max-width:56rem;margin:0 auto;padding:1rem}\
section,form.card{background:#fff;border:1px solid #ddd;border-radius:.5rem;padding:1rem;margin:0 0 1rem}\
label{display:block;font-weight:600;margin:.5rem 0 .2rem}\
input,select{font:inherit;padding:.45rem;border:1px solid #888;border-radius:.3rem;width:100%;max-width:24rem}\
button{font:inherit;padding:.45rem .9rem;border-radius:.3rem;border:1px solid #1b1b1f;background:#1b1b1f;color:#fff;cursor:pointer;margin-top:.5rem}\
button.secondary{background:#fff;color:#1b1b1f}button.danger{background:#b00020;border-color:#b00020}\
.error{color:#b00020;font-weight:600}.notice{background:#e8f4ea;border:1px solid #2e7d32;padding:.6rem;border-radius:.3rem}\
.warning{background:#fff4e5;border:1px solid #e65100;padding:.6rem;border-radius:.3rem}\
.table{overflow-x:auto}table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.4rem;border-bottom:1px solid #eee;vertical-align:top}\
code,pre{font-family:ui-monospace,monospace;font-size:.9em}pre{background:#f0f0f3;padding:.6rem;overflow-x:auto;white-space:pre-wrap;word-break:break-all}\
.secret{display:block;padding:.5rem;background:#f0f0f3;word-break:break-all;font-size:1rem}\
.row{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end}.row form{margin:0}.pages{display:flex;gap:1rem}\
svg{max-width:100%;height:auto}\
@media(max-width:640px){table.stack,table.stack tbody,table.stack tr,table.stack td{display:block}table.stack thead{display:none}\
table.stack tr{border-bottom:1px solid #ddd;padding:.5rem 0}table.stack td{border:0;padding:.15rem 0}\
table.stack td[data-label]::before{content:attr(data-label) \": \";font-weight:600}}";

const COPY_SCRIPT: &str = "document.querySelectorAll('[data-copy]').forEach(function(b){b.addEventListener('click',function(){var t=document.getElementById(b.dataset.copy).textContent;var s=document.getElementById(b.dataset.copy+'-status');var done=function(){if(s)s.textContent='Copied.'};if(navigator.clipboard){navigator.clipboard.writeText(t).then(done)}else{var r=document.createRange();r.selectNodeContents(document.getElementById(b.dataset.copy));var sel=getSelection();sel.removeAllRanges();sel.addRange(r);document.execCommand('copy');done()}})})";

/// The seed's quick-start call (its "cURL" example), verbatim.
pub const SEED_CURL: &str = "curl -X POST https://api.audiolib.ai/v1/audio \\
  -H \"Authorization: Bearer alp_your_api_key\" \\
  -H \"Content-Type: application/json\" \\
  -d '{\"library\":\"audio.focus\"}'";

/// Who is signed in, for the header.
pub struct Viewer<'a> {
    pub email: &'a str,
    pub csrf: &'a str,
    pub operator: bool,
}

fn page(title: &str, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · AudioLib developer portal" }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    strong { "AudioLib" }
                    @if let Some(v) = viewer {
                        nav {
                            @if v.operator {
                                a href="/operator" { "Accounts" }
                            } @else {
                                a href="/keys" { "API keys" }
                                a href="/usage" { "Usage" }
                            }
                        }
                        span { (v.email) }
                        form method="post" action="/signout" {
                            input type="hidden" name="csrf" value=(v.csrf);
                            button.secondary type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

fn field_error(id: &str, error: Option<&str>) -> Markup {
    html! {
        @if let Some(e) = error {
            p.error id=(id) role="alert" { (e) }
        }
    }
}

/// A page that only says something: an invalid link, a refused form, a wait.
pub fn message(title: &str, text: &str, link: Option<(&str, &str)>) -> Markup {
    page(
        title,
        None,
        html! {
            h1 { (title) }
            p { (text) }
            @if let Some((href, label)) = link {
                p { a href=(href) { (label) } }
            }
        },
    )
}

/// Sign in: `Email`, `Password`, `Sign in`.
pub fn sign_in(
    csrf: &str,
    email: &str,
    error: Option<&str>,
    notice: Option<&str>,
    signup_open: bool,
) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(n) = notice { p.notice role="status" { (n) } }
            form.card method="post" action="/signin" {
                (csrf_field(csrf))
                label for="email" { "Email" }
                input #email type="email" name="email" value=(email) autocomplete="username" required;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required aria-describedby="signin-error";
                (field_error("signin-error", error))
                div { button type="submit" { "Sign in" } }
            }
            @if signup_open {
                p { "No account yet? " a href="/signup" { "Create an account" } }
            } @else {
                p { "Accounts are by invitation: ask your AudioLib contact for an invite link." }
            }
            p { small { a href="/operator" { "Operator sign-in" } } }
        },
    )
}

/// Open sign-up: `Email`, `Password`, `Create account`.
pub fn sign_up(
    csrf: &str,
    email: &str,
    email_error: Option<&str>,
    pw_error: Option<&str>,
) -> Markup {
    page(
        "Create an account",
        None,
        html! {
            h1 { "Create an account" }
            p { "Accounts start on the free plan." }
            form.card method="post" action="/signup" {
                (csrf_field(csrf))
                label for="email" { "Email" }
                input #email type="email" name="email" value=(email) autocomplete="username" required aria-describedby="email-error";
                (field_error("email-error", email_error))
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="new-password" required aria-describedby="password-error";
                (field_error("password-error", pw_error))
                div { button type="submit" { "Create account" } }
            }
            p { a href="/signin" { "Sign in instead" } }
        },
    )
}

/// The invite's page: `Password`, `Set password`.
pub fn set_password(token: &str, csrf: &str, email: &str, error: Option<&str>) -> Markup {
    page(
        "Set your password",
        None,
        html! {
            h1 { "Set your password" }
            form.card method="post" action={"/invite/" (token)} {
                (csrf_field(csrf))
                label for="email" { "Email" }
                input #email type="email" name="email" value=(email) readonly autocomplete="username";
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="new-password" required aria-describedby="password-error";
                (field_error("password-error", error))
                div { button type="submit" { "Set password" } }
            }
        },
    )
}

/// A key shown once, right after it was made.
pub struct Shown<'a> {
    pub name: &'a str,
    pub secret: &'a str,
    pub rotated: bool,
}

fn when(t: &Option<String>) -> String {
    t.as_deref().map_or_else(
        || "never".to_string(),
        |s| s.replace('T', " ").replace('Z', " UTC"),
    )
}

/// The keys page: heading `API keys`, the list, `Key name` + `Create key`, and per key
/// `Rotate` (with a grace) and `Revoke` (which asks first).
pub fn keys(
    viewer: &Viewer,
    keys: &[KeyView],
    shown: Option<Shown>,
    name: &str,
    name_error: Option<&str>,
) -> Markup {
    page(
        "API keys",
        Some(viewer),
        html! {
            h1 { "API keys" }
            @if let Some(s) = shown {
                section.warning role="status" aria-labelledby="new-key-heading" {
                    h2 #new-key-heading {
                        @if s.rotated { "New secret for “" (s.name) "”" } @else { "Your new key “" (s.name) "”" }
                    }
                    code.secret #new-key { (s.secret) }
                    button.secondary type="button" data-copy="new-key" { "Copy" }
                    span #new-key-status aria-live="polite" {}
                    p { strong { "Copy it now: it will not be shown again." } " We keep only a digest of it." }
                }
            }
            section {
                h2 { "Create a key" }
                form method="post" action="/keys" {
                    (csrf_field(viewer.csrf))
                    label for="key-name" { "Key name" }
                    input #key-name type="text" name="name" value=(name) maxlength="200" aria-describedby="key-name-error";
                    (field_error("key-name-error", name_error))
                    div { button type="submit" { "Create key" } }
                }
            }
            section {
                h2 { "Your keys" }
                @if keys.is_empty() {
                    p { "No keys yet." }
                } @else {
                    div.table {
                        table.stack {
                            thead { tr { th { "Name" } th { "Prefix" } th { "Status" } th { "Created" } th { "Last used" } th { "Actions" } } }
                            tbody {
                                @for k in keys {
                                    tr data-key-id=(k.id) {
                                        td data-label="Name" { (k.name) }
                                        td data-label="Prefix" { code { (k.prefix) "…" } }
                                        td data-label="Status" { (k.status.as_str())
                                            @if let Some(until) = &k.previous_expires_at {
                                                br; small { "previous secret works until " (when(&Some(until.clone()))) }
                                            }
                                        }
                                        td data-label="Created" { (when(&Some(k.created_at.clone()))) }
                                        td data-label="Last used" { (when(&k.last_used_at)) }
                                        td {
                                            @if k.status == KeyStatus::Active || k.status == KeyStatus::Disabled {
                                                div.row {
                                                    form method="post" action={"/keys/" (k.id) "/rotate"} {
                                                        (csrf_field(viewer.csrf))
                                                        label for={"grace-" (k.id)} { "Old key keeps working for" }
                                                        select id={"grace-" (k.id)} name="grace" {
                                                            @for (secs, label) in GRACES {
                                                                option value=(secs) selected[secs == 3600] { (label) }
                                                            }
                                                        }
                                                        button.secondary type="submit" { "Rotate" }
                                                    }
                                                    form method="get" action={"/keys/" (k.id) "/revoke"} {
                                                        button.danger type="submit" { "Revoke" }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            script { (PreEscaped(COPY_SCRIPT)) }
        },
    )
}

/// Revoking asks first: the key's name and a `Revoke` button that posts.
pub fn confirm_revoke(viewer: &Viewer, key: &KeyView) -> Markup {
    page(
        "Revoke key",
        Some(viewer),
        html! {
            h1 { "Revoke “" (key.name) "”?" }
            p { "Calls with " code { (key.prefix) "…" } " will be refused at once, on every node. Revoking cannot be undone." }
            form.card method="post" action={"/keys/" (key.id) "/revoke"} {
                (csrf_field(viewer.csrf))
                input type="hidden" name="confirm" value="yes";
                button.danger type="submit" { "Revoke" }
                " "
                a href="/keys" { "Cancel" }
            }
        },
    )
}

/// Calls per day as bars, drawn on the server (no script, no image request).
pub fn chart(days: &[(Day, u64)]) -> Markup {
    let (w, h, pad) = (600u64, 160u64, 20u64);
    let max = days.iter().map(|(_, c)| *c).max().unwrap_or(0).max(1);
    let n = days.len().max(1) as u64;
    let slot = (w - pad) / n;
    let bar = slot.saturating_sub(2).max(1);
    let total: u64 = days.iter().map(|(_, c)| c).sum();
    html! {
        svg role="img" aria-label={"Calls per day this month, " (total) " in all"} viewBox={"0 0 " (w) " " (h + pad)} width=(w) height=(h + pad) {
            line x1=(pad) y1=(h) x2=(w) y2=(h) stroke="#888" {}
            text x="0" y="12" font-size="11" fill="#555" { (max) }
            text x="0" y=(h) font-size="11" fill="#555" { "0" }
            @for (i, (day, calls)) in days.iter().enumerate() {
                @let height = calls * (h - 20) / max;
                rect x=(pad + i as u64 * slot + 1) y=(h - height) width=(bar) height=(height) fill="#3949ab" {
                    title { (day) ": " (calls) " calls" }
                }
            }
            @if let (Some((first, _)), Some((last, _))) = (days.first(), days.last()) {
                text x=(pad) y=(h + 15) font-size="11" fill="#555" { (first) }
                text x=(w) y=(h + 15) font-size="11" fill="#555" text-anchor="end" { (last) }
            }
        }
    }
}

/// The usage page: heading `Usage`, the month against the plan, the chart, the reset date
/// and the quick-start.
pub fn usage(viewer: &Viewer, plan: &str, line: &str, days: &[(Day, u64)], reset: &str) -> Markup {
    page(
        "Usage",
        Some(viewer),
        html! {
            h1 { "Usage" }
            section {
                p #usage-line { strong { (line) } }
                p { "Plan: " (plan) ". The count resets on " (reset) " (UTC)." }
                (chart(days))
                p { small { "Counts are exact once the gateway's nodes have reported, within seconds." } }
            }
            section {
                h2 { "Quick start" }
                p { "Call the API with one of your " a href="/keys" { "keys" } " in place of " code { "alp_your_api_key" } ":" }
                pre { code { (SEED_CURL) } }
            }
        },
    )
}

/// An account in the operator's list.
pub struct AccountRow<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    pub plan: &'a str,
    pub status: &'a str,
}

/// A page of the operator's account list: its rows, whether pages come before it, and the
/// cursor of the next page.
pub struct AccountPage<'a> {
    pub rows: Vec<AccountRow<'a>>,
    pub later: bool,
    pub next: Option<&'a str>,
}

/// The operator's view: accounts (disable, enable), a page at a time, plans, and an invite
/// form.
pub fn operator(
    viewer: &Viewer,
    accounts: &AccountPage,
    plans: &[(String, String)],
    invite: Option<(&str, &str)>,
    error: Option<&str>,
) -> Markup {
    page(
        "Accounts",
        Some(viewer),
        html! {
            h1 { "Accounts" }
            @if let Some((email, url)) = invite {
                section.warning role="status" {
                    h2 { "Invite for " (email) }
                    code.secret #invite-link { (url) }
                    button.secondary type="button" data-copy="invite-link" { "Copy" }
                    span #invite-link-status aria-live="polite" {}
                    p { "Send this link to them: it sets their password, works once, and expires in 7 days. It is not shown again." }
                }
            }
            section {
                h2 { "Invite" }
                form method="post" action="/operator/accounts" {
                    (csrf_field(viewer.csrf))
                    label for="email" { "Email" }
                    input #email type="email" name="email" required;
                    label for="name" { "Name" }
                    input #name type="text" name="name" required maxlength="200";
                    label for="plan" { "Plan" }
                    select #plan name="plan" {
                        @for (name, _) in plans { option value=(name) { (name) } }
                    }
                    (field_error("invite-error", error))
                    div { button type="submit" { "Create account" } }
                }
            }
            section {
                h2 { "All accounts" }
                div.table { table {
                    thead { tr { th { "Email" } th { "Name" } th { "Plan" } th { "Status" } th {} } }
                    tbody {
                        @for a in &accounts.rows {
                            tr {
                                td { (a.email) } td { (a.name) } td { (a.plan) } td { (a.status) }
                                td {
                                    @if a.status != "closed" {
                                        form method="post" action={"/operator/accounts/" (a.id) "/invite"} {
                                            (csrf_field(viewer.csrf))
                                            button.secondary type="submit" { "New invite link" }
                                        }
                                        form method="post" action={"/operator/accounts/" (a.id) "/status"} {
                                            (csrf_field(viewer.csrf))
                                            @if a.status == "active" {
                                                input type="hidden" name="status" value="disabled";
                                                button.danger type="submit" { "Disable" }
                                            } @else {
                                                input type="hidden" name="status" value="active";
                                                button.secondary type="submit" { "Enable" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                } }
                @if accounts.later || accounts.next.is_some() {
                    p.pages {
                        @if accounts.later { a href="/operator" { "First page" } }
                        @if let Some(next) = accounts.next {
                            a href={"/operator?after=" (utf8_percent_encode(next, NON_ALPHANUMERIC))} { "Next page" }
                        }
                    }
                }
            }
            section {
                h2 { "Plans" }
                table {
                    thead { tr { th { "Plan" } th { "Monthly limit" } } }
                    tbody { @for (name, limit) in plans { tr { td { (name) } td { (limit) } } } }
                }
            }
            script { (PreEscaped(COPY_SCRIPT)) }
        },
    )
}

/// The operator's sign-in: the admin token.
pub fn operator_sign_in(csrf: &str, error: Option<&str>) -> Markup {
    page(
        "Operator sign-in",
        None,
        html! {
            h1 { "Operator sign-in" }
            form.card method="post" action="/operator" {
                (csrf_field(csrf))
                label for="token" { "Admin token" }
                input #token type="password" name="token" required aria-describedby="token-error";
                (field_error("token-error", error))
                div { button type="submit" { "Sign in" } }
            }
        },
    )
}
