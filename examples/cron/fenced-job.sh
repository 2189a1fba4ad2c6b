#!/bin/sh
# A job that guards its writes with the fencing token, so that a late write from
# an older holder (a paused VM, a write stuck in a queue) can never overwrite a
# newer one. Run it under leaderrun:
#
#   leaderrun --lock-id daily-report -- ./fenced-job.sh
#
# psql connects with libpq's own settings (PGSERVICE, PGHOST..., ~/.pgpass):
# leaderrun does not pass its LEADERRUN_DSN on to the job.
set -eu
token="${LEADERRUN_FENCING_TOKEN:?run this under leaderrun, which sets LEADERRUN_FENCING_TOKEN}"
result="${1:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"

# The write succeeds only if no holder with a larger token has written yet.
written=$(psql --no-psqlrc --quiet --tuples-only --no-align --set ON_ERROR_STOP=1 \
    --set token="$token" --set result="$result" <<'SQL'
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS daily_report (
    report  text   PRIMARY KEY,
    result  text   NOT NULL,
    fence   bigint NOT NULL
);
WITH written AS (
    INSERT INTO daily_report AS r (report, result, fence)
    VALUES ('daily', :'result', :'token')
    ON CONFLICT (report) DO UPDATE
        SET result = EXCLUDED.result, fence = EXCLUDED.fence
        WHERE r.fence <= EXCLUDED.fence
    RETURNING 1
)
SELECT count(*) FROM written;
SQL
)
if [ "$written" != 1 ]; then
    echo "fenced-job: fencing token $token is stale: a newer holder already wrote; nothing written" >&2
    exit 1
fi
echo "fenced-job: wrote $result with fencing token $token"
