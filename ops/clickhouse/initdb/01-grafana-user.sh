#!/bin/bash
# Run by the clickhouse-server image's entrypoint once, on the first start with an empty data
# volume (/docker-entrypoint-initdb.d). Creates the read-only user Grafana's data source logs in
# with (ops/grafana/provisioning/datasources/clickhouse.yaml).
#
# The closeloop DDL is not applied here: `closeloop migrate` (the migrate service) applies
# schemas/NNN_*.sql in order and records each version, which this folder cannot do.
#
# readonly = 1 forbids writes and DDL; max_execution_time stays changeable because the Grafana
# plugin's driver sets it on every query (the plugin's documented requirement).
set -euo pipefail

: "${GRAFANA_CLICKHOUSE_PASSWORD:?GRAFANA_CLICKHOUSE_PASSWORD must be set for the clickhouse service}"

clickhouse client --user "$CLICKHOUSE_USER" --password "$CLICKHOUSE_PASSWORD" --multiquery <<SQL
CREATE SETTINGS PROFILE IF NOT EXISTS grafana_readonly
    SETTINGS readonly = 1, max_execution_time = 60 CHANGEABLE_IN_READONLY;
CREATE USER IF NOT EXISTS grafana
    IDENTIFIED WITH sha256_password BY '${GRAFANA_CLICKHOUSE_PASSWORD}'
    SETTINGS PROFILE 'grafana_readonly';
GRANT SELECT ON default.* TO grafana;
SQL
