"""The web dashboard: one page at `/`, its scripts and styles under `/dashboard/`.

Plain JavaScript modules and CSS, no build step, nothing fetched from anywhere but this service
(users may run it offline). The page talks to the same HTTP API as any app, with the keys the
user enters, kept in the browser tab's session storage.
"""
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only this origin's scripts, styles and API; blob: for replaying a picked file. The microphone
# is allowed for this origin only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; media-src 'self' blob:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "Permissions-Policy": "microphone=(self)",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def mount_dashboard(app: FastAPI) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def dashboard_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/dashboard", StaticFiles(directory=STATIC_DIR), name="dashboard")
