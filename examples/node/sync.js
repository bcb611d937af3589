#!/usr/bin/env node
'use strict';
/**
 * node sync.js --url amqp://sync:sync@127.0.0.1:5673/ --user 7 --device dev-1 WorkOrder:1 WorkOrder:2
 *
 * Publishes one sync job, waits for its result and prints it as JSON.
 * Exit codes: 0 done or ignored, 1 rejected, 2 bad arguments, 3 no result (broker
 * unreachable or refused, timeout).
 */

const { parseArgs } = require('node:util');
const { InvalidJob, SyncClient, SyncError } = require('./client');

const USAGE = `usage: node sync.js [--url URL] --user ID [--device ID] [options] Entity:id ...

  --url URL             AMQP URL (default: $SYNC_AMQP_URL or amqp://sync:sync@127.0.0.1:5673/)
                        log in as the app server (sync) or as a device (device.<id>)
  --user ID             the session's user id
  --device ID           the session's device (a device account: its own, the default)
  --list E:1,2,3        a list of objects of one entity (repeatable)
  --query 'E[constraint]'
                        the objects of E matching an XPath constraint that the user
                        may read, e.g. 'WorkOrder[status = "Open"]' (repeatable)
  --deleted E:ID        an object deleted in the same call (repeatable)
  --new E:ID            an object that was never committed (repeatable)
  --uncommitted 'E:ID={"member":"value"}'
                        uncommitted changes the call made to an object (repeatable)
  --origin O            nanoflow (default) or event
  --job-id ID           your own job id; retrying with the same id is safe
  --timeout S           seconds to wait for the result (default 10)
  --no-wait             print {"job_id": ...} once the broker has the job
  --progress            print the job's progress to stderr while it runs ("published/total")
  -h, --help            this text

exit codes: 0 done or ignored, 1 rejected, 2 bad arguments, 3 no result`;

const EXIT = { ok: 0, rejected: 1, usage: 2, failed: 3 };

class UsageError extends Error {}

function ref(text, flag) {
  const at = text.lastIndexOf(':');
  const id = text.slice(at + 1);
  if (at < 1 || !/^[0-9]+$/.test(id))
    throw new UsageError(`${flag}: expected Entity:id, got ${JSON.stringify(text)}`);
  return { entity: text.slice(0, at), id: integer(id) };
}

// Ids above 2^53 stay exact as BigInts; the client sends both as JSON integers.
function integer(text) {
  const value = BigInt(text);
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
}

function list(text) {
  const at = text.lastIndexOf(':');
  const ids = text.slice(at + 1).split(',');
  if (at < 1 || !ids.every((id) => /^[0-9]+$/.test(id))) {
    throw new UsageError(`--list: expected Entity:1,2,3, got ${JSON.stringify(text)}`);
  }
  return { entity: text.slice(0, at), ids: ids.map(integer) };
}

// The entity's name up to the first '[', then its constraint.
function query(text) {
  const at = text.indexOf('[');
  if (at < 1) {
    throw new UsageError(`--query: expected Entity[constraint], got ${JSON.stringify(text)}`);
  }
  return { entity: text.slice(0, at).trim(), constraint: text.slice(at) };
}

function uncommitted(text) {
  const eq = text.indexOf('=');
  if (eq < 0)
    throw new UsageError(`--uncommitted: expected Entity:id={...}, got ${JSON.stringify(text)}`);
  let changes;
  try {
    changes = JSON.parse(text.slice(eq + 1));
  } catch (error) {
    throw new UsageError(`--uncommitted: ${error.message}`);
  }
  return { ref: ref(text.slice(0, eq), '--uncommitted'), changes };
}

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      url: {
        type: 'string',
        default: process.env.SYNC_AMQP_URL ?? 'amqp://sync:sync@127.0.0.1:5673/',
      },
      user: { type: 'string' },
      device: { type: 'string' },
      list: { type: 'string', multiple: true, default: [] },
      query: { type: 'string', multiple: true, default: [] },
      deleted: { type: 'string', multiple: true, default: [] },
      new: { type: 'string', multiple: true, default: [] },
      uncommitted: { type: 'string', multiple: true, default: [] },
      origin: { type: 'string', default: 'nanoflow' },
      'job-id': { type: 'string' },
      timeout: { type: 'string', default: '10' },
      'no-wait': { type: 'boolean', default: false },
      progress: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) return { help: true };
  if (values.user === undefined || !/^[0-9]+$/.test(values.user))
    throw new UsageError('--user: a user id is required');
  const timeout = Number(values.timeout);
  if (!(timeout > 0))
    throw new UsageError(`--timeout: expected seconds > 0, got ${values.timeout}`);
  if (positionals.length + values.list.length + values.query.length === 0)
    throw new UsageError('name at least one object (Entity:id), --list or --query');
  return {
    url: values.url,
    session: { userId: integer(values.user), deviceId: values.device },
    targets: {
      objects: positionals.map((text) => ref(text, 'object')),
      lists: values.list.map(list),
      queries: values.query.map(query),
      deleted: values.deleted.map((text) => ref(text, '--deleted')),
      new: values.new.map((text) => ref(text, '--new')),
      uncommitted: values.uncommitted.map(uncommitted),
      origin: values.origin,
      jobId: values['job-id'],
      wait: !values['no-wait'],
      timeoutMs: timeout * 1000,
      ...(values.progress
        ? { onProgress: (p) => console.error(`progress ${p.published}/${p.total}`) }
        : {}),
    },
  };
}

async function main(argv) {
  let args;
  try {
    args = parse(argv);
  } catch (error) {
    // parseArgs throws TypeErrors with a code for unknown or malformed options.
    if (!(error instanceof UsageError) && !String(error.code).startsWith('ERR_PARSE_ARGS'))
      throw error;
    console.error(`sync.js: ${error.message}\n(node sync.js --help shows the options)`);
    return EXIT.usage;
  }
  if (args.help) {
    console.log(USAGE);
    return EXIT.ok;
  }
  let client;
  try {
    client = await SyncClient.connect(args.url, { name: 'sync.js' });
    const answer = await client.synchronizeToDevice(args.session, args.targets);
    if (typeof answer === 'string') {
      console.log(JSON.stringify({ job_id: answer }));
      return EXIT.ok;
    }
    console.log(JSON.stringify(answer, null, 2));
    return answer.status === 'rejected' ? EXIT.rejected : EXIT.ok;
  } catch (error) {
    if (!(error instanceof SyncError)) throw error;
    console.error(`sync.js: ${error.message}`);
    return error instanceof InvalidJob ? EXIT.usage : EXIT.failed;
  } finally {
    await client?.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    // A bug, not bad input or a broker problem: still one line, no stack trace.
    console.error(`sync.js: unexpected error: ${error?.message ?? error}`);
    process.exitCode = EXIT.failed;
  },
);
