-- aiwg: the audit trail also records decisions on jobs waiting for approval (`approved`,
-- `rejected`), from the API and from platforms' comments.
ALTER TABLE aiwg_audit DROP CONSTRAINT aiwg_audit_decision_check;
ALTER TABLE aiwg_audit ADD CONSTRAINT aiwg_audit_decision_check
    CHECK (decision IN ('accepted', 'duplicate', 'refused', 'approved', 'rejected'));
