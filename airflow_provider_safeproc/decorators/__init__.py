"""Task decorators ``@task.parallel`` and ``@task.process_pool``, registered in get_provider_info."""
