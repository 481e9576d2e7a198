\set aid random(1, 100000 * :scale)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid /*action='pay',controller='checkout',framework='django%3A5.2.1',route='%2Fapi%2Fpay%2F%3Cint%3Aorder%3E%2F',traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01'*/;
