// The demo's service worker: shows each Web Push notification Herald sends (its payload is what a
// socket pushes, {"topic", "event", "id", "seq", "at", "data"}, or without "data" and with
// "truncated": true when the event was too large for a push).
self.addEventListener("push", (event) => {
  const message = event.data ? event.data.json() : {}
  const body = message.truncated ? "open the page to read it" : JSON.stringify(message.data)
  event.waitUntil(self.registration.showNotification(`${message.event} (#${message.seq})`, {
    body,
    tag: message.id,
  }))
})

self.addEventListener("notificationclick", (event) => {
  event.notification.close()
  event.waitUntil(self.clients.openWindow("/demo"))
})
