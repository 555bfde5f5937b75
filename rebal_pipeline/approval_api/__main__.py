"""python -m rebal_pipeline.approval_api [--host H] [--port P] [--no-migrate]"""

import argparse

from rebal_pipeline.approval_api.app import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rebal_pipeline.approval_api",
                                     description="Serve the rebal approval API with uvicorn.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-migrate", action="store_true", help="do not run the store's migrations first")
    args = parser.parse_args(argv)
    serve(args.host, args.port, migrate=not args.no_migrate)


if __name__ == "__main__":
    main()
