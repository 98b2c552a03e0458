//! Outbound webhooks (filled by the dispatcher issue).
