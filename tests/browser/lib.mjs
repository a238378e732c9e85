// Shared parts of the browser tests: the server under test, Chromium, and
// a reporter that prints one line per check and the closing tally.
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';

export const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream'];

export class Run {
  constructor(name, timeoutMs) {
    this.name = name;
    this.results = [];
    this.server = null;
    this.browser = null;
    this.timer = setTimeout(() => {
      this.check('finished within the time limit', false, `${timeoutMs} ms`);
      this.finish(1);
    }, timeoutMs);
  }

  check(name, ok, detail = '') {
    this.results.push({ name, ok });
    console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail ? ` — ${detail}` : ''}`);
    return ok;
  }

  async finish(code = 0) {
    clearTimeout(this.timer);
    try { await this.browser?.close(); } catch {}
    this.server?.kill('SIGTERM');
    const passed = this.results.filter((r) => r.ok).length;
    const failed = this.results.length - passed;
    console.log(`${passed} passed, ${failed} failed`);
    process.exit(code || (failed > 0 ? 1 : 0));
  }

  /** Base URL of a running server (SFU_URL) or of one started from SFU_BIN with `extraArgs`. */
  async startServer(extraArgs = []) {
    if (process.env.SFU_URL) return process.env.SFU_URL.replace(/\/$/, '');
    const bin = process.env.SFU_BIN;
    if (!bin) throw new Error('set SFU_URL or SFU_BIN');
    this.server = spawn(bin, ['--http-addr', '127.0.0.1:0', '--media-addr', '127.0.0.1:0', ...extraArgs], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, SFU_API_KEY: '', SFU_API_SECRET: '', SFU_LOG: process.env.SFU_LOG || 'warn,rtc=error,rtc_dtls=error' },
    });
    this.server.stderr.on('data', (d) => process.stderr.write(`[server] ${d}`));
    // Never leave the server behind, however this process ends.
    process.on('exit', () => this.server?.kill('SIGTERM'));
    return new Promise((resolve, reject) => {
      let buf = '';
      const timer = setTimeout(() => reject(new Error('server printed no "Demo: <url>" line within 15 s')), 15_000);
      this.server.stdout.on('data', (d) => {
        buf += d;
        const m = buf.match(/Demo: (http:\/\/\S+?)\/?\s/);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      this.server.on('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`server exited with ${signal || code}`));
      });
      this.server.on('error', (e) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${bin}: ${e.message}`));
      });
    });
  }

  /** Launches Debian's Chromium; failing to start is a failed check, never a skip. */
  async launch(extraArgs = []) {
    try {
      this.browser = await chromium.launch({
        executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
        headless: true,
        args: [...CHROMIUM_ARGS, ...extraArgs],
      });
    } catch (e) {
      this.check('chromium starts', false, e.message);
      await this.finish(1);
    }
    this.check('chromium starts', true);
    return this.browser;
  }
}

/** Polls `fn` (in node) until it returns truthy or `ms` pass; returns its last value. */
export async function pollUntil(fn, ms, intervalMs = 100) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v || Date.now() > deadline) return v;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Polls `fn` in the page until it returns truthy or `ms` pass. */
export async function waitIn(page, fn, arg, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await page.evaluate(fn, arg).catch(() => false);
    if (v) return v;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 100));
  }
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : NaN;
}

/**
 * A TCP proxy to the server at `baseUrl` (http://host:port) whose
 * connections can all be cut at once (reset, no WebSocket close): what the
 * server and the page see when a network goes away.
 */
export async function startProxy(baseUrl) {
  const net = await import('node:net');
  const target = new URL(baseUrl);
  const sockets = new Set();
  const server = net.createServer((down) => {
    const up = net.connect(Number(target.port), target.hostname);
    for (const s of [down, up]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => { sockets.delete(s); down.destroy(); up.destroy(); });
    }
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    base: `http://127.0.0.1:${server.address().port}`,
    cut() {
      const n = sockets.size;
      for (const s of sockets) s.resetAndDestroy();
      return n;
    },
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
