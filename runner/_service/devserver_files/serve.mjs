// Runs the pinned Durable Streams reference server on loopback for pullwake-runner.
// Usage: node serve.mjs '{"port":0,"host":"127.0.0.1","dataDir":"...","longPollTimeout":30000}'
// Prints one JSON line {"url": ...} once listening; stops on SIGTERM/SIGINT or when stdin closes
// (so it never outlives the process that started it).
import { DurableStreamTestServer } from "@durable-streams/server"

const options = JSON.parse(process.argv[2] ?? "{}")
if (options.host && !["127.0.0.1", "localhost", "::1"].includes(options.host)) {
  console.error(`refusing to listen on ${options.host}: loopback only`)
  process.exit(2)
}
const server = new DurableStreamTestServer({ host: "127.0.0.1", ...options })
const url = await server.start()
process.stdout.write(JSON.stringify({ url, pid: process.pid }) + "\n")

let stopping = false
async function stop() {
  if (stopping) return
  stopping = true
  const timer = setTimeout(() => process.exit(1), 5000)
  try {
    await server.stop()
  } finally {
    clearTimeout(timer)
    process.exit(0)
  }
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
process.stdin.on("end", stop)
process.stdin.on("error", stop)
process.stdin.resume()
