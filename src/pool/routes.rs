//! The routes sessions hold, one copy per route.
//!
//! Part of the pool set, on the login path only. A session keeps its route (database, user,
//! server address and database, pool settings) for its whole life; every idle client held its
//! own copy of the route's four names. [`Routes::share`] hands sessions with an equal route
//! one `Arc`: the map holds weak references, so a route no session holds any more (after a
//! reload changed it, or once its clients left) is dropped as the map grows.

use std::sync::{Arc, Mutex, Weak};

use super::PoolKey;
use crate::config::Route;

/// Routes by pool, shared by the sessions that hold them.
#[derive(Debug, Default)]
pub(crate) struct Routes(Mutex<crate::FastMap<PoolKey, Weak<Route>>>);

/// Below this many routes the map is not swept.
const SWEEP_FROM: usize = 64;

impl Routes {
    /// `route`, as the `Arc` sessions with an equal route hold already if there is one.
    pub(crate) fn share(&self, route: Route) -> Arc<Route> {
        let key = PoolKey::of(&route);
        let mut routes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = routes.get(&key).and_then(Weak::upgrade) {
            if *r == route {
                return r;
            }
        }
        // Swept each time the map doubles: routes no session holds go (amortized O(1)).
        if routes.len() >= SWEEP_FROM && routes.len().is_power_of_two() {
            routes.retain(|_, r| r.strong_count() > 0);
        }
        let r = Arc::new(route);
        routes.insert(key, Arc::downgrade(&r));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolMode;

    fn len(routes: &Routes) -> usize {
        routes.0.lock().unwrap().len()
    }

    fn route(database: &str, host: &str) -> Route {
        Route {
            database: database.into(),
            user: "app".into(),
            host: host.into(),
            port: 5432,
            server_dbname: database.into(),
            pool_size: 20,
            pool_mode: PoolMode::Transaction,
        }
    }

    #[test]
    fn sessions_of_one_route_share_it_and_a_changed_route_is_new() {
        let routes = Routes::default();
        let a = routes.share(route("app", "db1"));
        let b = routes.share(route("app", "db1"));
        assert!(Arc::ptr_eq(&a, &b), "one copy for both sessions");
        // A reload moved the database: new sessions get the new route, old ones keep theirs.
        let c = routes.share(route("app", "db2"));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.host, "db1");
        assert_eq!(c.host, "db2");
        assert!(Arc::ptr_eq(&c, &routes.share(route("app", "db2"))));
        assert!(!Arc::ptr_eq(&a, &routes.share(route("other", "db1"))), "another pool");
    }

    #[test]
    fn routes_nobody_holds_are_swept_as_the_map_grows() {
        let routes = Routes::default();
        let kept = routes.share(route("kept", "db"));
        for i in 0..1000 {
            drop(routes.share(route(&format!("gone{i}"), "db")));
        }
        assert!(len(&routes) <= 2 * SWEEP_FROM, "{} routes kept", len(&routes));
        assert!(
            Arc::ptr_eq(&kept, &routes.share(route("kept", "db"))),
            "a held one stays"
        );
    }
}
