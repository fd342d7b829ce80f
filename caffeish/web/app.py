"""The Starlette application of `caffeish serve`: routes, templates, limits and errors.

Routes render Jinja2 templates (autoescape on: every name from a file or a request is HTML-escaped)
and call caffeish.web.pages, which calls the library.  Long work runs as a Task (caffeish.web.tasks)
whose page polls its progress.  Errors are one line: a page for a browser, JSON for `.json` routes
and for requests that ask for JSON; never a traceback (unexpected ones are logged).

Limits: request bodies over `max_upload` bytes are refused (413) before they are read, images over
`max_pixels` before they are decoded; POSTs from another origin are refused (403); with
`allowed_hosts`, requests naming another Host are refused (DNS rebinding).
"""
import contextlib
import logging
import os

import jinja2

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from caffeish.errors import CaffeishError
from caffeish.formats.io import printable
from caffeish.runtime import backend
from caffeish.web import jobs as jobs_mod
from caffeish.web import pages
from caffeish.web.tasks import Tasks
from caffeish.web.workspace import Workspace, WorkspaceError, check_name

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MAX_UPLOAD = 64 << 20
MAX_FILES = 32
log = logging.getLogger("caffeish.web")


class TooLarge(Exception):
    pass


class UploadLimit:
    """Refuses request bodies over `limit` bytes: by Content-Length at once, else while they stream."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(self.limit, send, scope)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except TooLarge:
            await _too_large(self.limit, send, scope)


async def _too_large(limit, send, scope):
    text = f"error: the upload is larger than the limit of {limit / (1 << 20):.0f} MiB (serve --max-upload)"
    wants_json = scope["path"].endswith(".json") or b"application/json" in dict(scope["headers"]).get(b"accept", b"")
    response = JSONResponse({"error": text}, 413) if wants_json else Response(
        f"<!doctype html><title>Too large</title><p class=error>{text}</p>", 413, media_type="text/html")
    await response(scope, _noop_receive, send)


async def _noop_receive():
    return {"type": "http.disconnect"}


class OneLineErrors:
    """An unexpected exception: logged with its traceback, answered with one line (500)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            log.exception("request %s failed", scope.get("path"))
            if started:
                raise
            text = f"error: internal error ({type(e).__name__}); the server log has the details"
            await Response(text, 500, media_type="text/plain")(scope, _noop_receive, send)


class SameOrigin:
    """Refuses a POST whose Origin (or Referer) is another site: pages elsewhere cannot drive the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope.get("headers") or [])
            origin = headers.get(b"origin") or headers.get(b"referer")
            host = headers.get(b"host", b"")
            if origin and origin != b"null":
                rest = origin.split(b"://", 1)[-1].split(b"/", 1)[0]
                if rest != host:
                    response = Response("error: a request from another site was refused", 403)
                    return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(root, stores=(), max_upload=DEFAULT_MAX_UPLOAD, max_pixels=pages.DEFAULT_MAX_PIXELS,
               allowed_hosts=None, max_jobs=1):
    """The ASGI app over the workspace `root` (see caffeish.web.workspace); max_jobs: training jobs
    that may run at once (caffeish.web.jobs)."""
    ws = Workspace(root, stores)
    jobs = jobs_mod.Jobs(ws, max_jobs)
    backend.tune_allocator()  # nets run in task threads: the main thread's malloc arena for them too
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")), autoescape=True)
    templates = Jinja2Templates(env=env)
    tasks, results = Tasks(), pages.Results()
    state = {"ws": ws, "tasks": tasks, "results": results, "max_pixels": max_pixels, "max_upload": max_upload,
             "jobs": jobs}

    def render(request, template, status=200, **context):
        return templates.TemplateResponse(request, template, dict(context, workspace=ws.root), status_code=status)

    def model_of(request):
        return ws.model(request.path_params["name"])

    def row_of(model, request):
        rows = pages.model_summary(model)["rows"]
        i = _int(request.path_params["index"], "layer")
        if not 0 <= i < len(rows):
            raise WorkspaceError(f"model '{model.name}' has no layer {i}")
        return i, rows[i]

    def start(request, title, fn):
        task = tasks.start(title, fn)
        return RedirectResponse(f"/tasks/{task.id}", 303)

    # -- pages -------------------------------------------------------------------------------------
    def home(request):
        return render(request, "index.html", models=ws.models(), datasets=ws.datasets(), stores=ws.stores(),
                      jobs=[jobs.summary(jobs.get(n)) for n in jobs.names()])

    def models(request):
        listed = []
        for location in ws.stores():
            try:
                listed.append({"location": location, "models": pages.store_models(location), "error": None})
            except CaffeishError as e:
                listed.append({"location": location, "models": [], "error": printable(str(e))})
        return render(request, "models.html", models=ws.models(), stores=listed)

    def model_page(request):
        model = model_of(request)
        summary = pages.model_summary(model)
        return render(request, "model.html", model=model, s=summary, offsets=pages.offsets_view(model),
                      conv=pages.first_conv(model), datasets=ws.datasets(),
                      weights=os.path.basename(model.weights) if model.weights else None)

    def model_svg(request):
        model = model_of(request)
        svg = pages.model_svg(model, lambda i: f"/models/{model.name}/layers/{i}")
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-cache"})

    def layer_page(request):
        model = model_of(request)
        i, row = row_of(model, request)
        blobs = pages.layer_blobs(model, row) if row.get("params") else []
        text = pages.layer_text(row["param"]) if row.get("param") is not None else ""
        return render(request, "layer.html", model=model, index=i, row=row, text=text,
                      blobs=[{"label": label, "shape": "x".join(map(str, a.shape)), "stats": pages.pictures.stats(a)}
                             for label, a in blobs])

    def layer_histogram(request):
        model = model_of(request)
        i, row = row_of(model, request)
        kinds = pages.layer_blobs(model, row)
        if not kinds:
            raise WorkspaceError(f"layer {i} of model '{model.name}' has no parameters")
        return _png(pages.pictures.histogram_png(row["name"], kinds))

    def filters(request):
        model = model_of(request)
        i = pages.first_conv(model)
        if i is None:
            raise WorkspaceError(f"model '{model.name}' has no Convolution")
        row = pages.model_summary(model)["rows"][i]
        w = pages.layer_blobs(model, row)[0][1]
        if w.ndim != 4:
            raise WorkspaceError(f"layer '{printable(row['name'])}' has no 4-D filters")
        return _png(pages.pictures.filters_png(row["name"], w))

    # -- inference ---------------------------------------------------------------------------------
    async def infer(request):
        model = model_of(request)
        form = await request.form(max_files=MAX_FILES, max_fields=50)
        images, pre, visualize, tile = await inference_form(form, model)

        def run(task):
            result = pages.run_inference(task, model, images, pre, visualize=visualize, tile=tile)
            task.next_url = f"/results/{results.add(result)}"
            return result

        return start(request, f"{model.name}: {len(images)} image(s)", run)

    async def inference_form(form, model, dataset=None):
        """(images, preprocess, visualize, tile) of an inference form (uploads and/or a dataset record;
        `dataset`: that dataset's record instead of the form's)."""
        images = []
        for upload in form.getlist("images"):
            if getattr(upload, "filename", None) is None:
                continue
            data = await upload.read()
            if data:
                images.append((upload.filename, await run_in_threadpool(pages.decode_upload, data, upload.filename,
                                                                        max_pixels)))
        dataset = dataset or form.get("dataset")
        if dataset:
            images.append(await run_in_threadpool(pages.dataset_image, ws, str(dataset),
                                                  str(form.get("split", "val")), _int(form.get("record", "0"), "record")))
        if not images:
            raise CaffeishError("no image: choose one or more image files, or a dataset record")
        pre = pages.preprocess_for(model, str(form.get("mean", "auto")), str(form.get("mean_value", "")))
        visualize = form.get("visualize") == "on"
        tile = None
        if form.get("tile"):
            from caffeish.values import parse_wxh

            tile = parse_wxh(str(form.get("tile")), "tile")[::-1]
        return images, pre, visualize, tile

    def result_of(request):
        return _found(results.get(request.path_params["rid"]),
                      "no such result (results are kept in memory for the last 16 runs)")

    def item_of(request):
        result = result_of(request)
        k = _int(request.path_params["k"], "image")
        if not 0 <= k < len(result["items"]):
            raise WorkspaceError("no such image in the result")
        return result["items"][k]

    def result_page(request):
        result = result_of(request)
        return render(request, "result.html", result=result, rid=request.path_params["rid"])

    def result_picture(request):
        item = item_of(request)
        kind = request.path_params["kind"]
        if kind in ("image", "classmap") and kind in item:
            return _png(item[kind])
        if kind.startswith("act") and kind[3:].isdigit() and int(kind[3:]) < len(item.get("activations", [])):
            return _png(item["activations"][int(kind[3:])]["png"])
        raise WorkspaceError("no such picture")

    def result_classes(request):
        item = item_of(request)
        if "classes" not in item:
            raise WorkspaceError("no class map for this image")
        return Response(item["classes"], media_type="application/octet-stream",
                        headers={"X-Width": str(item["width"]), "X-Height": str(item["height"]),
                                 "X-Bytes": str(item["class_bytes"])})

    # -- surgery and offsets -------------------------------------------------------------------------
    async def surgery(request):
        model = model_of(request)
        form = await request.form(max_files=0, max_fields=20)
        op = str(form.get("operation", ""))
        new = check_name(str(form.get("name", "")).strip(), "new model")
        ws.new_model_path(new)  # refused at once when taken
        if op == "convolutionalize":
            fn = lambda task: pages.convolutionalize(ws, model, new)  # noqa: E731
        elif op == "fcn":
            classes = _int(form.get("classes", ""), "classes")
            skips = [s.strip() for s in str(form.get("skip", "")).split(",") if s.strip()]
            fn = lambda task: pages.build_fcn(ws, model, new, classes, skips)  # noqa: E731
        elif op == "fix-offsets":
            fn = lambda task: pages.fix_offsets(ws, model, new)  # noqa: E731
        else:
            raise CaffeishError(f"unknown operation '{printable(op)}': convolutionalize, fcn or fix-offsets")

        def run(task):
            fn(task)
            task.next_url = f"/models/{new}"

        return start(request, f"{op} {model.name} -> {new}", run)

    async def import_model(request):
        form = await request.form(max_files=0, max_fields=20)
        location = ws.store_location(str(form.get("store", "")))
        name = str(form.get("model", ""))
        new = check_name(str(form.get("name", "") or name).strip(), "new model")
        ws.new_model_path(new)

        def run(task):
            pages.import_model(ws, location, name, new)
            task.next_url = f"/models/{new}"

        return start(request, f"import {printable(name)} -> {new}", run)

    # -- datasets --------------------------------------------------------------------------------------
    def datasets(request):
        return render(request, "datasets.html", datasets=ws.datasets(), folders=ws.folders())

    async def build_dataset(request):
        form = await request.form(max_files=0, max_fields=20)
        name = check_name(str(form.get("name", "")).strip(), "dataset")
        images = ws.resolve(str(form.get("images", "")), kind="dir")
        labels = ws.resolve(str(form.get("labels", "")), kind="dir")
        color_map = ws.resolve(str(form["color_map"]), kind="file") if form.get("color_map") else None
        resize = None
        if form.get("resize"):
            from caffeish.values import parse_wxh

            resize = parse_wxh(str(form.get("resize")), "resize")[::-1]
        try:
            val = float(form.get("val_fraction", "0.1"))
        except ValueError:
            raise CaffeishError("val fraction: a number between 0 and 1") from None
        if not 0 <= val < 1:
            raise CaffeishError("val fraction: a number between 0 and 1 (excluding 1)")
        ws.new_dataset_path(name)

        def run(task):
            pages.build_dataset(ws, name, images, labels, val, resize, color_map)
            task.next_url = f"/datasets/{name}"

        return start(request, f"dataset {name}", run)

    def dataset_page(request):
        root = ws.dataset(request.path_params["name"])
        view = pages.dataset_view(root)
        split = request.query_params.get("split") or next(iter(view["splits"]), None)
        if split is not None and split not in view["splits"]:
            raise WorkspaceError(f"dataset has no split '{printable(split)}'")
        page = max(0, _int(request.query_params.get("page", "0"), "page"))
        per = 12
        count = view["splits"][split]["records"] if split and view["type"] == "segmentation" else 0
        samples = list(range(page * per, min(count, (page + 1) * per)))
        colors = pages.dataset_palette(root, len(view["classes"]))
        legend = [{"index": i, "name": n, "color": "#%02x%02x%02x" % tuple(int(v) for v in colors[i]),
                   "share": 100.0 * view["pixels"][i] / max(1, view["total_pixels"])}
                  for i, n in enumerate(view["classes"])]
        return render(request, "dataset.html", name=request.path_params["name"], view=view, split=split,
                      samples=samples, page=page, pages=max(1, -(-count // per)), legend=legend)

    def dataset_distribution(request):
        return _png(pages.distribution_png(ws.dataset(request.path_params["name"])))

    def dataset_sample(request):
        root = ws.dataset(request.path_params["name"])
        kind = request.path_params["kind"]
        if kind not in ("image", "label", "overlay"):
            raise WorkspaceError("no such picture")
        return _png(pages.dataset_sample(root, request.path_params["split"],
                                         _int(request.path_params["index"], "record"), kind))

    # -- training jobs ------------------------------------------------------------------------------------
    def job_of(request):
        return jobs.get(request.path_params["name"])

    def jobs_page(request):
        return render(request, "jobs.html", jobs=[jobs.summary(jobs.get(n)) for n in jobs.names()])

    def new_job_page(request):
        datasets = pages.training_datasets(ws)
        models = [m for m in ws.models() if m.deploy]
        network = request.query_params.get("model", "")
        default_weights = f"model:{network}" if any(m.name == network and m.weights for m in models) else ""
        gpu = backend.gpu_unavailable_reason()
        return render(request, "new_job.html", models=models, datasets=datasets, network=network, no_gpu=gpu,
                      dataset=request.query_params.get("dataset", ""), weights=jobs.weights_choices(),
                      default_weights=default_weights, solver_types=jobs_mod.SOLVER_TYPES,
                      policies=jobs_mod.LR_POLICIES)

    async def create_job(request):
        form = await request.form(max_files=0, max_fields=60)
        name = check_name(str(form.get("name", "")).strip(), "job")
        settings = jobs_mod.settings_from_form(form)
        await run_in_threadpool(jobs.create, name, str(form.get("network", "")), str(form.get("dataset", "")),
                                str(form.get("weights", "")), settings)
        return RedirectResponse(f"/jobs/{name}", 303)

    def job_status(job):
        s = jobs.state(job)
        try:
            curves = job.curves()
        except CaffeishError as e:  # a damaged curves.csv: the page still shows the job, and says so
            from caffeish.apps.curves import Curves

            curves = Curves(None)
            s["message"] = " ".join(filter(None, [s.get("message"), printable(str(e))]))
        latest = jobs_mod.latest_values(curves)
        max_iter = job.max_iter()
        iteration = latest["iteration"] if latest["iteration"] is not None else s.get("iteration")
        if s["state"] == jobs_mod.DONE and s.get("iteration") is not None:
            iteration = s["iteration"]
        stamp = job.curves_stamp("curves.png") if s["state"] in (jobs_mod.RUNNING, jobs_mod.STARTING) else \
            job.curves_stamp()
        return {"name": job.name, "state": s["state"], "stopping": s.get("stopping", False),
                "message": s.get("message", ""), "iteration": iteration, "max_iter": max_iter,
                "fraction": min(1.0, iteration / max_iter) if iteration is not None and max_iter else None,
                "loss": latest["loss"], "lr": latest["lr"], "test": latest["test"],
                "test_iteration": latest["test_iteration"], "points": latest["points"],
                "curves": f"{stamp[1]}-{stamp[2]}" if stamp else "",
                "snapshots": [{"iteration": it, "model": f"/jobs/{job.name}/snapshots/{it}/caffemodel",
                               "state": f"/jobs/{job.name}/snapshots/{it}/solverstate" if st else None}
                              for it, _, st in job.snapshots()],
                "log": job.log_tail(8 << 10)}

    def job_page(request):
        job = job_of(request)
        status = job_status(job)
        texts = {}
        for name in ("solver.prototxt", "train_val.prototxt"):
            path = job.file(name)
            if path:
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts[name] = f.read(64 << 10)
        return render(request, "job.html", job=job, cfg=job.config, st=status, texts=texts)

    def job_json(request):
        return JSONResponse(job_status(job_of(request)), headers={"Cache-Control": "no-cache"})

    def job_curves(request):
        job = job_of(request)
        running = jobs.state(job)["state"] in (jobs_mod.RUNNING, jobs_mod.STARTING)
        try:
            return _png(job.picture(running, lambda stamp: _curve_pictures.get(
                ("curves", job.folder, stamp), lambda: job.curves().png_bytes())))
        except CaffeishError as e:
            raise WorkspaceError(f"job '{job.name}': no curves to draw ({printable(str(e))})") from None

    def job_log(request):
        job = job_of(request)
        path = job.file("log.txt")
        if path is None:
            raise WorkspaceError(f"job '{job.name}' has no log yet")
        return FileResponse(path, media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-cache"})

    def job_snapshot(request):
        job = job_of(request)
        it = _int(request.path_params["iteration"], "iteration")
        kind = request.path_params["kind"]
        for i, model, state in job.snapshots():
            if i == it and kind in ("caffemodel", "solverstate"):
                path = model if kind == "caffemodel" else state
                if path:
                    return FileResponse(path, media_type="application/octet-stream",
                                        filename=f"{job.name}_{os.path.basename(path)}")
        raise WorkspaceError(f"job '{job.name}' has no {printable(kind)[:20]} at iteration {it}")

    async def stop_job(request):
        job = job_of(request)
        await run_in_threadpool(jobs.stop, job)
        return RedirectResponse(f"/jobs/{job.name}", 303)

    async def resume_job(request):
        job = job_of(request)
        form = await request.form(max_files=0, max_fields=10)
        more = str(form.get("max_iter", "") or "").strip()
        max_iter = _int(more, "iterations") if more else None
        if max_iter is not None and not 1 <= max_iter < 2**31:
            raise CaffeishError(f"iterations: between 1 and {2**31 - 1}")
        await run_in_threadpool(jobs.resume, job, max_iter)
        return RedirectResponse(f"/jobs/{job.name}", 303)

    async def delete_job(request):
        job = job_of(request)
        await run_in_threadpool(jobs.delete, job)
        return RedirectResponse("/jobs", 303)

    async def test_job(request):
        job = job_of(request)
        form = await request.form(max_files=MAX_FILES, max_fields=50)
        model = job.snapshot_model(_int(form.get("iteration", ""), "iteration"))
        use = form.get("use_dataset") == "on"
        images, pre, visualize, tile = await inference_form(form, model, job.config.get("dataset") if use else None)

        def run(task):
            result = pages.run_inference(task, model, images, pre, visualize=visualize, tile=tile)
            result["back"] = {"url": f"/jobs/{job.name}", "title": model.title}
            task.next_url = f"/results/{results.add(result)}"
            return result

        return start(request, f"{model.title}: {len(images)} image(s)", run)

    async def publish_job(request):
        job = job_of(request)
        form = await request.form(max_files=0, max_fields=10)
        model = job.snapshot_model(_int(form.get("iteration", ""), "iteration"))
        new = check_name(str(form.get("name", "")).strip(), "new model")
        ws.new_model_path(new)

        def run(task):
            pages.publish_snapshot(ws, job, model, new)
            task.next_url = f"/models/{new}"

        return start(request, f"{model.title} -> model {new}", run)

    # -- tasks -------------------------------------------------------------------------------------------
    def task_of(request):
        return _found(tasks.get(request.path_params["tid"]), "no such task")

    def task_page(request):
        task = task_of(request)
        if task.state == "done" and task.next_url:
            return RedirectResponse(task.next_url, 303)
        return render(request, "task.html", task=task.as_dict())

    def task_json(request):
        return JSONResponse(task_of(request).as_dict())

    # -- errors --------------------------------------------------------------------------------------------
    def error(request, status, text):
        if request.url.path.endswith(".json") or "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"error": text}, status)
        return render(request, "error.html", status=status, message=text)

    async def on_workspace_error(request, exc):
        return error(request, 404, f"error: {printable(str(exc))}")

    async def on_caffeish_error(request, exc):
        return error(request, 409 if isinstance(exc, jobs_mod.JobError) else 400, f"error: {printable(str(exc))}")

    async def on_http(request, exc):
        return error(request, exc.status_code, f"error: {printable(str(exc.detail))}")

    routes = [
        Route("/", home),
        Route("/models", models),
        Route("/import", import_model, methods=["POST"]),
        Route("/models/{name}", model_page),
        Route("/models/{name}/net.svg", model_svg),
        Route("/models/{name}/filters.png", filters),
        Route("/models/{name}/layers/{index}", layer_page),
        Route("/models/{name}/layers/{index}/histogram.png", layer_histogram),
        Route("/models/{name}/infer", infer, methods=["POST"]),
        Route("/models/{name}/surgery", surgery, methods=["POST"]),
        Route("/results/{rid}", result_page),
        Route("/results/{rid}/{k}/classes.bin", result_classes),
        Route("/results/{rid}/{k}/{kind}.png", result_picture),
        Route("/datasets", datasets),
        Route("/datasets", build_dataset, methods=["POST"]),
        Route("/datasets/{name}", dataset_page),
        Route("/datasets/{name}/distribution.png", dataset_distribution),
        Route("/datasets/{name}/samples/{split}/{index}/{kind}.png", dataset_sample),
        Route("/jobs", jobs_page),
        Route("/jobs", create_job, methods=["POST"]),
        Route("/jobs/new", new_job_page),
        Route("/jobs/{name}", job_page),
        Route("/jobs/{name}/status.json", job_json),
        Route("/jobs/{name}/curves.png", job_curves),
        Route("/jobs/{name}/log.txt", job_log),
        Route("/jobs/{name}/snapshots/{iteration}/{kind}", job_snapshot),
        Route("/jobs/{name}/stop", stop_job, methods=["POST"]),
        Route("/jobs/{name}/resume", resume_job, methods=["POST"]),
        Route("/jobs/{name}/delete", delete_job, methods=["POST"]),
        Route("/jobs/{name}/test", test_job, methods=["POST"]),
        Route("/jobs/{name}/publish", publish_job, methods=["POST"]),
        Route("/tasks/{tid}.json", task_json),
        Route("/tasks/{tid}", task_page),
        Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
    ]
    middleware = [Middleware(OneLineErrors), Middleware(UploadLimit, limit=max_upload), Middleware(SameOrigin)]
    if allowed_hosts:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(jobs.shutdown)  # running jobs: a snapshot, then the end (resumable)

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers={
        WorkspaceError: on_workspace_error, CaffeishError: on_caffeish_error, HTTPException: on_http})
    app.state.web = state
    return app


_curve_pictures = pages.Cache(8)


def _found(thing, missing):
    if thing is None:
        raise WorkspaceError(missing)
    return thing


def _int(value, what):
    try:
        return int(str(value))
    except ValueError:
        raise CaffeishError(f"{what}: a whole number, not '{printable(str(value))[:40]}'") from None


def _png(data):
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})


class Background:
    """The app served by uvicorn in a thread on a free port of 127.0.0.1 (tests, benchmarks):
    `with Background(app) as served: served.url`."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        end = time.time() + 30
        while not self.server.started:
            if time.time() > end or not self.thread.is_alive():
                raise CaffeishError("the web app did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
